"""Writing the files keras-patch produces: checked paths, atomic replacement, normal permissions.

Every `.tflite`, sketch file and plot keras-patch writes goes through these
helpers, so that:

* a bad output path is refused *before* any work, with a message that names
  the path the user gave (not a hidden temporary file);
* a failed or interrupted write leaves the old file (or nothing) in place;
* a new file gets the permissions the user's umask gives (like `open()`),
  and overwriting a file keeps the mode it had.

This module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from typing import Union

from keras_patch.errors import KerasPatchError

PathLike = Union[str, os.PathLike]


def current_umask() -> int:
    """The process's umask (read without changing it where the OS allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _kept_or_umask_mode(path: PathLike, is_kind, full_mode: int) -> int:
    """The permission bits of what is at `path` if `is_kind(st_mode)`, else `full_mode & ~umask`."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and is_kind(st.st_mode):
        return stat.S_IMODE(st.st_mode)
    return full_mode & ~current_umask()


def new_file_mode(path: PathLike) -> int:
    """Mode for a file about to be (re)written at `path`.

    Returns:
        The permission bits of the file already at `path`, or those a new
        file gets from the umask (`0o666 & ~umask`, as `open()` creates).
    """
    return _kept_or_umask_mode(path, stat.S_ISREG, 0o666)


def new_folder_mode(path: PathLike) -> int:
    """Mode for a folder about to be (re)created at `path` (kept, or `0o777 & ~umask`)."""
    return _kept_or_umask_mode(path, stat.S_ISDIR, 0o777)


def check_output_path(path: PathLike) -> str:
    """Checks that a file can be written at `path`, before any work is done.

    Args:
        path: the output file the user named.

    Returns:
        `path` as a string.

    Raises:
        KerasPatchError: empty path, a folder (or a path ending in a
            separator), something other than a regular file in the way, a
            missing parent folder, a parent that is not a folder, or one the
            user may not write in. The message names `path` as given.
    """
    path = os.fspath(path)
    if not path.strip():
        raise KerasPatchError("cannot write '': the output path is empty; name a file.")
    if os.path.isdir(path):
        raise KerasPatchError(f"cannot write '{path}': it is a folder; name a file in it instead.")
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise KerasPatchError(f"cannot write '{path}': it names a folder; name a file.")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise KerasPatchError(f"cannot write '{path}': something other than a regular file is there.")
    parent = os.path.dirname(path) or os.curdir
    if not os.path.exists(parent):
        raise KerasPatchError(f"cannot write '{path}': the folder '{parent}' does not exist.")
    if not os.path.isdir(parent):
        raise KerasPatchError(f"cannot write '{path}': '{parent}' is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KerasPatchError(f"cannot write '{path}': no permission to create files in '{parent}'.")
    return path


def write_atomically(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file, so failures leave nothing.

    The old file at `path`, if any, stays intact until the new one is
    complete, and its mode is kept; a new file gets `0o666 & ~umask`.

    Raises:
        KerasPatchError: `path` cannot be written (see `check_output_path`).
        OSError: writing failed (e.g. the disk is full); the message names
            `path`.
    """
    path = check_output_path(path)
    directory = os.path.dirname(os.path.abspath(path))
    mode = new_file_mode(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kp-", suffix=".tmp", dir=directory)
    except OSError as e:
        raise OSError(e.errno, f"cannot write '{path}': {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write '{path}': {e.strerror}") from None
        raise


def figure_format(path: PathLike) -> str:
    """The image format a figure written to `path` gets: its extension, or PNG without one.

    Raises:
        KerasPatchError: an extension matplotlib cannot write, or `path`
            cannot be written (see `check_output_path`).
    """
    path = check_output_path(path)
    ext = os.path.splitext(path)[1][1:].lower()
    if not ext:
        return "png"
    from matplotlib.backend_bases import FigureCanvasBase

    supported = sorted(FigureCanvasBase.get_supported_filetypes())
    if ext not in supported:
        raise KerasPatchError(f"cannot write the plot '{path}': unknown image format '.{ext}' "
                              f"(use one of .{', .'.join(supported)}; no extension writes PNG).")
    return ext


def save_figure(fig, path: PathLike, dpi: int = 120) -> str:
    """Writes a matplotlib figure to exactly `path` (atomically, normal permissions).

    matplotlib's `savefig` appends `.png` to a path without an extension;
    here the format is taken from the extension (PNG without one) and the
    file is written where the user said.

    Returns:
        The path written (`path` as a string).
    """
    path = os.fspath(path)
    fmt = figure_format(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=fmt)
    write_atomically(path, buffer.getvalue())
    return path
