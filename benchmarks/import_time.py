"""Import time of keras_patch vs TensorFlow (+Keras) alone, each in fresh processes.

    python benchmarks/import_time.py [--repeats 5]

Prints the median wall-clock time of `import tensorflow, keras` and of
`import keras_patch` (which imports both) and their ratio.
"""

import argparse
import statistics
import subprocess
import sys
import time


def _median_import_seconds(statement: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _median_import_seconds("import keras_patch", 1)  # warm the file cache
    baseline = _median_import_seconds("import tensorflow, keras", args.repeats)
    ours = _median_import_seconds("import keras_patch", args.repeats)
    print(f"{'import':<26}{'median s':>10}")
    print(f"{'tensorflow, keras':<26}{baseline:>10.2f}")
    print(f"{'keras_patch':<26}{ours:>10.2f}")
    print(f"ratio keras_patch / tensorflow+keras: {ours / baseline:.3f}")


if __name__ == "__main__":
    main()
