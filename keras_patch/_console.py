"""What the command line shows on stderr: no TensorFlow log noise, progress on long steps.

TensorFlow logs from C++ while it loads (oneDNN, CUDA and CPU-feature notices,
"All log messages before absl::InitializeLog() ..."), before any setting a
program can make reaches absl; `import_tensorflow` therefore loads it with
file descriptor 2 captured, and shows what was captured only if the import
fails. `--verbose` lets everything through.

Example:

>>> from keras_patch._console import Progress, configure_output
>>> configure_output(verbose=False)
>>> with Progress().step("converting to int8"):
...     pass  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from typing import IO, Iterator, Optional

# Lines TensorFlow prints while it loads, when nothing silences them.
TENSORFLOW_NOISE = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations",
    "cudart_stub",
    "cpu_feature_guard",
    "Could not find cuda drivers",
)

_NOISY_LOGGERS = ("tensorflow", "absl", "h5py")


def configure_output(verbose: bool) -> None:
    """Quiet (default) or verbose logging for one command line run.

    Quiet: TensorFlow's C++ logs below FATAL (`TF_CPP_MIN_LOG_LEVEL=3`, unless
    the environment sets it), Python warnings, and the TensorFlow/absl Python
    loggers below ERROR are dropped. Verbose: keras-patch logs at DEBUG (the
    converter's own output included) and TensorFlow keeps its defaults.
    Floating-point behaviour (oneDNN) is left alone either way.
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s: %(message)s")
        logging.getLogger("keras_patch").setLevel(logging.DEBUG)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.simplefilter("ignore")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[IO[bytes]]:
    """File descriptor 2 goes to a temporary file; its text is replayed if the block raises."""
    try:
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
        saved = os.dup(fd)
    except (OSError, ValueError):
        yield None
        return
    sink = tempfile.TemporaryFile()
    if sys.__stderr__ is not None:
        sys.__stderr__.flush()
    os.dup2(sink.fileno(), fd)
    try:
        yield sink
    except BaseException:
        os.dup2(saved, fd)
        sink.seek(0)
        os.write(saved, sink.read())
        raise
    finally:
        if sys.__stderr__ is not None:
            sys.__stderr__.flush()
        os.dup2(saved, fd)
        os.close(saved)
        sink.close()


def import_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow and Keras; without `verbose`, what they print while loading is dropped."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    if verbose:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

        return
    with _stderr_captured():
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf_logging sets its own level on import


#: A line `Progress` prints off a terminal when a step ends ("loading m.keras ... 1.2 s").
PROGRESS_LINE = re.compile(r".* \.\.\. \d+\.\d s")


class Progress:
    """Steps of a long command on stderr.

    On a terminal each step is a line with a running clock (tqdm) that stays
    with its final time when the step ends; otherwise each step is one plain
    line with its time when it ends. A step that fails leaves no line, so
    that the error is the one line a failed command prints. The clock writes to a copy of the terminal's file
    descriptor, so steps that capture file descriptor 2 (TensorFlow's import,
    the converter) do not freeze it.

    Args:
        enabled: False shows nothing.
        stream: where to write (default: `sys.stderr` at the time of each step).
    """

    def __init__(self, enabled: bool = True, stream: Optional[IO[str]] = None):
        self.enabled = enabled
        self.stream = stream

    @contextlib.contextmanager
    def step(self, message: str) -> Iterator[None]:
        """Shows `message` while the block runs."""
        stream = self.stream if self.stream is not None else sys.stderr
        if not self.enabled:
            yield
            return
        terminal = _terminal_copy(stream)
        if terminal is None:
            start = time.monotonic()
            yield  # a step that fails prints nothing: its error stays the one line
            print(f"{message} ... {time.monotonic() - start:.1f} s", file=stream, flush=True)
            return
        from tqdm import tqdm

        with terminal:
            bar = tqdm(total=None, desc=message, bar_format="{desc} ... {elapsed}", file=terminal,
                       leave=True, dynamic_ncols=True, nrows=2)  # nrows: tqdm hides bars on 0-row ttys
            stop = threading.Event()

            def tick() -> None:
                while not stop.wait(0.5):
                    bar.refresh()

            ticker = threading.Thread(target=tick, name="keras-patch-progress", daemon=True)
            ticker.start()
            try:
                yield
            except BaseException:
                bar.leave = False  # a failed step's line is cleared: its error stays the one line
                raise
            finally:
                stop.set()
                ticker.join()
                bar.close()


def _terminal_copy(stream) -> Optional[IO[str]]:
    """A new file object on a duplicate of `stream`'s descriptor if it is a terminal, else None."""
    try:
        if not stream.isatty():
            return None
        return os.fdopen(os.dup(stream.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        return None
