"""The one parser and validator of a patch grid, for every API that takes `grid=`.

A grid is `(n_h, n_w)` patches along height and width: a pair of positive
Python ints (numpy integers too; not bools, not floats), an int `n` for
`(n, n)`, or, where text is allowed (`patchify`, the command line), ASCII
`"NxM"` or `"N"`.

>>> check_grid((4, 2))
(4, 2)
>>> check_grid("3x3")
(3, 3)
>>> check_grid(True)
Traceback (most recent call last):
...
keras_patch.errors.KerasPatchError: `grid` must be an int or a pair (n_h, n_w) of positive ints, got True (bool).
"""

from __future__ import annotations

import re
from typing import Tuple

import numpy as np

from keras_patch.errors import KerasPatchError

# ASCII only: `str.isdigit`/`int` also take fullwidth and other Unicode digits.
_GRID_TEXT = re.compile(r"\s*([+-]?[0-9]+)\s*(?:[xX×]\s*([+-]?[0-9]+)\s*)?", re.ASCII)


def _is_int(value) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, np.ndarray) and value.ndim):
        return False
    return isinstance(value, (int, np.integer)) or (
        hasattr(value, "__index__") and not isinstance(value, (float, np.floating))
    )


def check_grid(grid, allow_string: bool = True) -> Tuple[int, int]:
    """Validates `grid` and returns it as `(n_h, n_w)` Python ints.

    Args:
        grid: a pair of positive ints, an int `n` for `(n, n)`, or (with
            `allow_string`) ASCII text `"NxM"` / `"N"`.
        allow_string: whether text is accepted.

    Returns:
        `(n_h, n_w)`.

    Raises:
        KerasPatchError: anything else, naming the value at fault: bools,
            floats, other lengths, zero or negative counts, text in another
            form or with non-ASCII digits.
    """
    if isinstance(grid, str) and allow_string:
        match = _GRID_TEXT.fullmatch(grid)
        if not match:
            raise KerasPatchError(
                f"grid {grid!r} must look like '4x4' (rows x columns) or '4', in ASCII digits."
            )
        grid = (int(match.group(1)), int(match.group(2) or match.group(1)))
    elif _is_int(grid):
        grid = (grid, grid)
    elif isinstance(grid, np.ndarray) and grid.ndim == 1:
        grid = tuple(grid.tolist())
    if isinstance(grid, (str, bytes)) or not isinstance(grid, (tuple, list)):
        raise KerasPatchError(
            "`grid` must be an int or a pair (n_h, n_w) of positive ints, "
            f"got {grid!r} ({type(grid).__name__})."
        )
    if len(grid) != 2:
        raise KerasPatchError(
            f"`grid` must be a pair (n_h, n_w) of positive ints, got {len(grid)} values: {tuple(grid)!r}."
        )
    for axis, value in zip(("n_h", "n_w"), grid):
        if not _is_int(value):
            raise KerasPatchError(
                f"`grid` must hold ints, got {axis}={value!r} ({type(value).__name__}) in {tuple(grid)!r}."
            )
        if int(value) < 1:
            raise KerasPatchError(
                f"`grid` must hold positive ints, got {axis}={int(value)} in {tuple(int(v) for v in grid)!r}."
            )
    return int(grid[0]), int(grid[1])
