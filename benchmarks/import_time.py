"""Wall-clock time of the command line and of `import keras_patch`, each in fresh processes.

    python benchmarks/import_time.py [--repeats 5] [--model model.tflite]

Prints the best of N wall-clock times (the least disturbed by other load) of
`keras-patch --help`, `keras-patch --version`, `import keras_patch`,
`keras-patch profile MODEL.tflite` (default: a model converted once from
tests/model_zoo.py's residual_model) and, for comparison,
`import tensorflow, keras`: none of the keras-patch lines imports TensorFlow.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
            "TF_CPP_MIN_LOG_LEVEL": "3"}


def best_seconds(argv, repeats: int) -> float:
    """Least wall-clock time of `argv` over `repeats` fresh runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=_env())
        times.append(time.perf_counter() - start)
    return min(times)


def _default_model(folder: str) -> str:
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import model_zoo\n"
        "open(%r, 'wb').write(model_zoo.to_int8_tflite(model_zoo.residual_model()))\n"
    )
    path = os.path.join(folder, "residual.tflite")
    subprocess.run([sys.executable, "-c", code % (os.path.join(REPO, "tests"), path)], check=True,
                   capture_output=True, env=_env())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", help="int8 .tflite to profile (default: a small residual CNN)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or _default_model(folder)
        cli = [sys.executable, "-m", "keras_patch.cli"]
        cases = [
            ("keras-patch --help", cli + ["--help"]),
            ("keras-patch --version", cli + ["--version"]),
            ("import keras_patch", [sys.executable, "-c", "import keras_patch"]),
            (f"keras-patch profile {os.path.basename(model)}", cli + ["profile", model]),
            ("import tensorflow, keras", [sys.executable, "-c", "import tensorflow, keras"]),
        ]
        best_seconds(cases[2][1], 1)  # warm the file cache
        print(f"{'command':<40}{'best of ' + str(args.repeats) + ' (s)':>16}")
        for label, argv in cases:
            print(f"{label:<40}{best_seconds(argv, args.repeats):>16.2f}", flush=True)


if __name__ == "__main__":
    main()
