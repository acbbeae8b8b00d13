"""Paths a user names are confined: names are plain names, and a dir is only ever deleted or
replaced by the command that created it.

- A **name** that becomes a path component (a recipe name, `output.name`, a suite's or strategy's
  name) is letters, digits, '.', '_' or '-', starting with a letter or digit: no '/', no '..', no
  absolute path, so `<dir>/<name>` stays inside `<dir>`.
- A **marker** file (`.hybridtune-compare`, `.hybridtune-export`) in a dir a command created says
  the dir is that command's. The command replaces or cleans only a dir holding its own marker
  (or a new or empty one); anything else named as `--out` is refused, so a typo can never make it
  delete a user's directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from hybridtune.errors import UserError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_RULE = "a name of letters, digits, '.', '_' or '-' (no '/', not starting with '.')"
MAX_NAME = 200  # file systems allow 255 bytes per component; a run name gets suffixes (-s42, .tmp)


def is_safe_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_NAME and bool(SAFE_NAME.fullmatch(value))


def check_name(value: str, where: str) -> str:
    """`value` when it is a safe path component, else a UserError naming `where`."""
    if not is_safe_name(value):
        raise UserError(where, repr(value)[:100], NAME_RULE)
    return value


def inside(path: Path, root: Path) -> bool:
    """Whether `path` lies inside `root` (or is it), symlinks resolved."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def owned(path: Path, marker: str) -> bool:
    """Whether `path` is a real dir (not a symlink) holding the marker file `marker`."""
    return path.is_dir() and not path.is_symlink() and (path / marker).is_file()


def claim(path: Path, marker: str, what: str, where: str) -> Path:
    """Make `path` a dir owned by `marker`: a new dir, an empty one, or one that holds the marker
    already. A file, a symlink or a non-empty dir of someone else's is refused (exit 2)."""
    if path.is_symlink():
        raise UserError(where, f"'{path}', a symbolic link", f"a new dir, or a {what} (not a link to one)")
    if path.exists():
        if not path.is_dir():
            raise UserError(where, f"'{path}', a file", f"a new dir, or a {what}")
        if not (path / marker).is_file() and any(path.iterdir()):
            raise UserError(
                where,
                f"'{path}', a dir that is not a {what} (no {marker})",
                f"a new or empty dir, or a {what} written by hybridtune",
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / marker).touch()
    except OSError as e:
        raise UserError(
            where, f"'{path}' that cannot be written ({e.strerror})", "a writable directory"
        ) from None
    return path
