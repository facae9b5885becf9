"""`python -m keras_patch.arduino sync|check`: regenerate or verify `arduino/KerasPatch`.

    python -m keras_patch.arduino sync    # rewrite src/, library.properties, keywords.txt
    python -m keras_patch.arduino check   # exit 1 and list the files that are out of date
"""

import argparse
import sys

from keras_patch.arduino.library import library_diff, sync_library


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_patch.arduino", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("sync", "check"))
    args = parser.parse_args(argv)
    if args.command == "sync":
        changed = sync_library()
        for rel in changed:
            print(f"updated arduino/KerasPatch/{rel}")
        print("arduino/KerasPatch is in sync with tflm_ops/" + (" (no changes)" if not changed else ""))
        return 0
    problems = library_diff()
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("run: python -m keras_patch.arduino sync", file=sys.stderr)
        return 1
    print("arduino/KerasPatch is in sync with tflm_ops/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
