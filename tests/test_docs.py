"""The Python code blocks of README.md and docs/*.md run as written.

Each ```python block runs in a fresh interpreter in an empty temporary
folder. A block that cannot run on its own (it needs the reader's data or a
trained model) is marked in the markdown with `<!-- not-run: reason -->` on
the line before it; it is skipped with that reason. The `keras-patch`
command lines of the README are checked against the CLI's parser.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")
)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")


def python_blocks(path: str) -> list:
    """(first line number, code, not-run reason or None) of each ```python block of a markdown file."""
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _NOT_RUN.search(before)
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = [(path, line, code, reason) for path in DOCS for line, code, reason in python_blocks(path)]


def test_blocks_found_and_not_run_markers_have_reasons():
    assert any(path == "README.md" for path, *_ in BLOCKS)
    not_run = [(path, line, reason) for path, line, _, reason in BLOCKS if reason is not None]
    assert all(reason for *_, reason in not_run), not_run
    assert len(not_run) <= len(BLOCKS) // 2, f"most blocks must run: {not_run}"


@pytest.mark.slow
@pytest.mark.parametrize("path, line, code, reason", BLOCKS, ids=[f"{p}:{n}" for p, n, _, _ in BLOCKS])
def test_python_block_runs(path, line, code, reason, tmp_path):
    if reason is not None:
        pytest.skip(f"{path}:{line} marked not-run: {reason}")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (
        f"{path}:{line} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )
    if "print(logits)" in code:  # the README's "Use it": its int8 logits must not all be the same
        printed = proc.stdout[proc.stdout.rindex("[["):]
        assert len(set(re.findall(r"-?\d+", printed))) > 1, printed


def readme_commands() -> list:
    """The `keras-patch ...` lines of the README's code blocks (placeholders as written)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("keras-patch ")]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_lines_parse(command):
    """Every subcommand and option the README shows exists, and each choice list offers what it shows."""
    from keras_patch.cli import build_parser

    parser = build_parser()
    words = shlex.split(command)[1:]
    if words[0].startswith("-"):  # keras-patch --version
        assert words[0] in parser._option_string_actions, command
        return
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert words[0] in subparsers.choices, command
    sub = subparsers.choices[words[0]]
    options = {s: a for a in sub._actions for s in a.option_strings}
    for word in re.findall(r"--[a-z][a-z0-9-]*", command):
        assert word in options, f"{command}: no option {word}"
    for action in options.values():
        if action.choices:
            for flag in action.option_strings:
                shown = re.search(re.escape(flag) + r" ([\w|-]+)", command)
                if shown:
                    assert set(shown.group(1).split("|")) <= set(action.choices), command
