"""Deterministic fault injection for crash tests. `ITERKD_FAULT=POINT` (or `POINT:N`, the N-th time
the point is reached, counting from 1) makes the process SIGKILL itself there, so a test kills a run
at an exact place in the code rather than after a sleep. `ITERKD_FAULT_SIGNAL=INT` or `TERM` sends
that signal instead (Ctrl-C, or `kill`). Unset, a point costs one environment lookup."""

from __future__ import annotations

import os
import signal

ENV = "ITERKD_FAULT"
SIGNAL_ENV = "ITERKD_FAULT_SIGNAL"
POINTS = (
    "trial-created",
    "mid-epoch",
    "checkpoint-written",
    "trial-told",
    "between-generations",
    "selection",
)
_seen: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here, like a kill -9 or a power cut, when ITERKD_FAULT names this point (and count)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        # raise_signal delivers to this thread and runs Python's handler before it returns, so the
        # KeyboardInterrupt of a Ctrl-C comes from this line (os.kill sends to the process).
        signal.raise_signal(getattr(signal, "SIG" + os.environ.get(SIGNAL_ENV, "KILL")))
