"""Fault injection: PIFI_FAST_FAULT="point:n" kills the process at the n-th pass through a
named point of a run (step, eval, checkpoint_write), so the reliability tests can kill a run at a
known moment, as a crash or an out-of-memory kill would."""
from __future__ import annotations

import collections
import os
import signal


_fault_counts: collections.Counter = collections.Counter()


def fault_point(name: str) -> None:
    """PIFI_FAST_FAULT="name:n" SIGKILLs this process the n-th time it passes `name` (fault
    injection for the reliability tests: a kill at a known moment, as a crash or OOM would)."""
    spec = os.environ.get("PIFI_FAST_FAULT")
    if not spec or spec.partition(":")[0] != name:
        return
    _fault_counts[name] += 1
    if _fault_counts[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
