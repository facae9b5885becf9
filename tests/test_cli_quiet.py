"""A first run is quiet and clear: no TensorFlow log noise unless --verbose, progress on long steps."""

import fcntl
import json
import os
import re
import pty
import struct
import subprocess
import sys
import termios
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

from keras_patch._console import TENSORFLOW_NOISE, Progress
from keras_patch.cli import build_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_keras(tmp_path_factory):
    import keras
    from keras_patch import PatchStage

    keras.utils.set_random_seed(0)
    block = keras.Sequential([keras.Input((12, 12, 3)),
                              keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu6")])
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.GlobalAveragePooling2D()(PatchStage(block, grid=(2, 2), name="stage")(inputs))
    path = tmp_path_factory.mktemp("quiet") / "small.keras"
    keras.Model(inputs, keras.layers.Dense(2)(x)).save(path)
    return path


def _keras_patch(*argv: str) -> subprocess.CompletedProcess:
    """`keras-patch ARGV` as a user runs it: a fresh process, TensorFlow's logging left at its defaults."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "keras_patch.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=600)


def test_profile_keras_is_quiet_unless_verbose(small_keras):
    verbose = _keras_patch("profile", str(small_keras), "--json", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    if not any(marker in verbose.stderr for marker in TENSORFLOW_NOISE):
        pytest.skip("TensorFlow logs none of the known lines on this machine: nothing to hide")
    assert "converter output" in verbose.stderr  # keras-patch's debug log, too

    quiet = _keras_patch("profile", str(small_keras), "--json")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    noise = [marker for marker in TENSORFLOW_NOISE if marker in quiet.stderr]
    assert noise == [], quiet.stderr
    # Progress, one line per step (stderr is not a terminal here), and nothing else.
    steps = [re.sub(r" \d+\.\d s$", " N s", line) for line in quiet.stderr.splitlines()]
    assert steps == [
        "loading TensorFlow ... N s",
        f"loading {small_keras} ... N s",
        "converting to int8 and profiling (about a minute for MobileNetV2) ... N s",
    ]
    assert json.loads(quiet.stdout) == json.loads(verbose.stdout)  # stdout: only the result


def test_failed_quiet_import_shows_what_it_hid(tmp_path):
    """What TensorFlow printed is dropped only when the import succeeds."""
    (tmp_path / "keras.py").write_text("import os\nos.write(2, b'why it failed\\n')\nraise ImportError('boom')\n")
    code = ("import sys\nfrom keras_patch._console import import_tensorflow\n"
            "try:\n    import_tensorflow()\nexcept ImportError as e:\n    print('raised', e)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert "raised boom" in proc.stdout, proc.stderr
    assert "why it failed" in proc.stderr


def test_verbose_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["profile", "m.tflite"]).verbose is False
    assert parser.parse_args(["--verbose", "profile", "m.tflite"]).verbose is True
    assert parser.parse_args(["profile", "m.tflite", "-v"]).verbose is True
    assert parser.parse_args(["demo", "--verbose"]).verbose is True


def test_progress_on_a_terminal_shows_a_running_clock():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        with os.fdopen(os.dup(follower), "w") as terminal:
            with Progress(stream=terminal).step("converting to int8"):
                time.sleep(1.2)
        shown = os.read(leader, 4096).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert "converting to int8 ... 00:00" in shown
    assert "converting to int8 ... 00:01" in shown  # refreshed while the step ran


def test_progress_elsewhere_is_one_line_per_step(capsys):
    progress = Progress()
    with progress.step("one"):
        pass
    with progress.step("two"):
        pass
    with Progress(enabled=False).step("hidden"):
        pass
    with pytest.raises(KeyError):
        with progress.step("fails"):
            raise KeyError("x")
    assert capsys.readouterr().err == "one ... 0.0 s\ntwo ... 0.0 s\n"  # a failed step: no line
