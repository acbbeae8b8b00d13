"""A training child its parent owns (compare's `hybridtune train` processes): it asks the kernel for
SIGKILL when the parent dies (Linux prctl PR_SET_PDEATHSIG), so a SIGKILLed parent leaves no orphan
training on; `stop` ends the child's process group (SIGINT first: the run stays resumable)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int):
    """A preexec_fn: the child gets SIGKILL when the compare process dies (Linux prctl
    PR_SET_PDEATHSIG); if the compare died before this ran, the child ends itself at once."""

    def set_signal() -> None:
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            except (OSError, AttributeError):
                return
            if os.getppid() != parent:
                os._exit(1)

    return set_signal


def stop(proc: subprocess.Popen) -> None:
    """Stop a training child and its process group: SIGINT (as Ctrl-C would: the run stays
    resumable), then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
