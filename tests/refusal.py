"""The project's rule for bad input, checked in one place: exit code 2, one line on stderr naming the
key path or file:row with what was found and what was expected, no traceback, and nothing written.

`refused(args, out, *words)` runs `hybridtune ARGS` in this process and checks all of it;
`assert_refused` checks a result made elsewhere (a real process, a CliRunner with its own env);
`failed_in_one_line` is the part every failing command keeps, exit code 3 included.
"""

from __future__ import annotations

import os
from pathlib import Path

from .conftest import cli


def snapshot(root: Path) -> dict[str, tuple] | None:
    """Every path under root with its kind, size and content hash (links as their target); None
    where root does not exist."""
    if not root.exists():
        return None
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = ("file", path.stat().st_size, hash(path.read_bytes()))
        else:
            out[rel] = ("dir",)
    return out


def failed_in_one_line(result, code: int, *words: str) -> str:
    """`result` (typer's CliRunner result, or a subprocess.CompletedProcess run with text=True) ended
    with exit code `code` and one short line on stderr holding each of `words`, with no traceback on
    stdout or stderr. Returns the line."""
    exit_code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    message = result.stderr.strip()
    assert exit_code == code, (exit_code, message[-2000:], getattr(result, "exception", None))
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(message.splitlines()) == 1, message
    assert len(message) < 1200, len(message)  # never the size of the bad input itself
    for word in words:
        assert word in message, (word, message)
    return message


def assert_refused(result, out: Path | None, *words: str, before=None, absent: bool = False) -> str:
    """`result` was refused by the rule: exit code 2, one line with "found", "expected" and each of
    `words`, no traceback; and nothing written under `out`: the same as `before` (its `snapshot`,
    where it existed), else absent or an empty dir; with `absent`, never made (search and compare
    make their dir only once they start). `out` None: the command names no dir to check. Returns the
    line."""
    message = failed_in_one_line(result, 2, "found", "expected", *words)
    if out is None:
        return message
    if before is not None:
        assert snapshot(out) == before, f"{out}: a refused input changed files"
    elif absent:
        assert not out.exists(), f"{out} was made"
    else:
        assert not out.exists() or not any(out.iterdir()), f"{out}: a run dir was left behind"
    return message


def refused(args: list[str], out: Path | None, *words: str, absent: bool = False) -> str:
    """`hybridtune ARGS` in this process is refused by the rule (`assert_refused`); what `out` held
    before the call is there after it, unchanged. Returns the line."""
    before = snapshot(out) if out is not None else None
    return assert_refused(cli(args), out, *words, before=before, absent=absent)
