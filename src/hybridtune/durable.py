"""Durable writes and one writer per dir: what rundir.py and train/checkpoints.py stand on.

- **Temp names** are unique (pid + random): two processes writing the same file never share one.
- **fsync**: a file is flushed to disk before it is renamed into place, and its directory after, so a
  rename survives a power cut, not only a killed process (a rename without them can reach the disk
  before the data it names: ext4 `auto_da_alloc` covers only some cases, XFS none).
- **Replacing a directory** (`final/`, a re-saved checkpoint) is one atomic exchange of the new and
  the old dir (Linux renameat2 RENAME_EXCHANGE), then the old one is removed: there is no moment
  without the target. Where the filesystem cannot exchange, the old dir is first renamed aside to
  `.NAME.*.old` and `recover_dir` puts it back if a kill came between the two renames.
- **Removing a directory** renames it to a dot-name first, then deletes it: a kill inside the delete
  leaves a hidden remnant, never a partial `checkpoint-N` under its real name.
- **A lock per dir** (`.lock`, flock + the holder's pid): a second writer of a run dir or compare dir
  is refused with the holder's pid; the kernel drops the lock when its process dies (a stale lock
  file is simply taken over).

`HYBRIDTUNE_TEST_KILL_AT` is a test-only hook: `maybe_kill(point, value)` SIGKILLs the process when
the variable is `point:value`, so tests can kill each writer between each of its steps.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path

from hybridtune.errors import UserError

KILL_ENV = "HYBRIDTUNE_TEST_KILL_AT"
LOCK = ".lock"


def maybe_kill(point: str, value: object) -> None:
    """SIGKILL this process when HYBRIDTUNE_TEST_KILL_AT is `point:value` (tests only; else a no-op)."""
    if os.environ.get(KILL_ENV) == f"{point}:{value}":
        os.kill(os.getpid(), signal.SIGKILL)


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """`.NAME.PID-RANDOM.KIND` beside `path`: hidden, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def fsync_dir(path: Path) -> None:
    """Make the entries of `path` (a rename, a new file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform that cannot open a directory (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a filesystem without directory fsync
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(Path(here))
        for name in files:
            path = Path(here) / name
            if path.is_symlink():
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in reversed(dirs):
        fsync_dir(path)


def write_bytes(path: Path, data: bytes) -> None:
    """`data` to a unique temp file, fsync'd, renamed over `path`, the directory fsync'd. The temp file
    is removed on any error; the caller maps the OSError."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        maybe_kill("write", path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where the platform or the
    filesystem cannot (then nothing was changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc < 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_dir(path: Path) -> None:
    """Rename `path` to a hidden name, make that durable, then delete it: never a partial dir under
    its real name."""
    if not path.exists():
        return
    doomed = temp_name(path, "del")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    maybe_kill("remove", path.name)
    shutil.rmtree(doomed, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished dir `new` (already fsync'd) at `target`, replacing what is there: exchanged in
    one step, the old one removed after; where exchange is impossible, old aside, new in, old removed
    (`recover_dir` undoes a kill between the two renames)."""
    parent = target.parent
    if not target.exists():
        os.rename(new, target)
        fsync_dir(parent)
        return
    if exchange(new, target):
        fsync_dir(parent)
        maybe_kill("exchanged", target.name)
        remove_dir(new)  # now the old one
        return
    old = temp_name(target, "old")
    os.rename(target, old)
    maybe_kill("aside", target.name)
    os.rename(new, target)
    fsync_dir(parent)
    remove_dir(old)


def recover_dir(target: Path) -> None:
    """A dir that a kill left renamed aside (`.NAME.*.old`, see `replace_dir`) goes back to `target`
    when `target` is missing."""
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.*.old"))
    if aside:
        os.rename(aside[-1], target)
        fsync_dir(target.parent)


def clean_temp(root: Path) -> None:
    """Remove what killed writes left in `root` (`.NAME.PID-RANDOM.tmp|old|del`); only call it while
    holding `root`'s lock (no other writer is at work)."""
    for kind in ("tmp", "del", "old"):
        for path in root.glob(f".*.*-*.{kind}"):
            if kind == "old" and not (root / path.name[1:].rsplit(".", 2)[0]).exists():
                continue  # the only copy: recover_dir puts it back
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# one writer per dir


class DirLock:
    """A held lock of a dir; `release()` (or process death) frees it."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd < 0:
            return
        self.path.unlink(missing_ok=True)  # while still held: the next locker makes a new file
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_in(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: the filesystem has no flock."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return None
        raise


def lock_dir(path: Path, where: str) -> DirLock:
    """Hold `path`'s lock for this process, or refuse (UserError naming the holder's pid). A lock
    file left by a dead process is taken over: the kernel released its flock; on a filesystem
    without flock, the pid in the file is checked instead."""
    lock = path / LOCK
    tries = 0
    while True:
        tries += 1
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(
                where, f"'{path}' that cannot be written ({e.strerror})", "a writable directory"
            ) from None
        got = _try_flock(fd)
        holder = _pid_in(fd)
        if got is None:  # no flock here: the pid in the file decides
            got = holder is None or holder == os.getpid() or not _alive(holder)
        if not got and tries < 4:  # perhaps only a `lock_holder` look (it holds the lock a moment)
            os.close(fd)
            time.sleep(0.05)
            continue
        if not got:
            os.close(fd)
            raise UserError(
                where,
                f"'{path}' in use by process {holder} (lock {lock})",
                "one writer at a time: wait for that process to end, or stop it (kill "
                f"{holder}); a lock whose process is dead is taken over",
            )
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed the file as we opened it: lock the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        return DirLock(fd, lock)


def lock_holder(path: Path) -> int | None:
    """The pid of a live process holding `path`'s lock, or None."""
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None
    try:
        got = _try_flock(fd)
        holder = _pid_in(fd)
        if got is None:
            return holder if holder is not None and _alive(holder) and holder != os.getpid() else None
        if got:  # nobody holds it (we just did): let go again
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return holder
    finally:
        os.close(fd)
