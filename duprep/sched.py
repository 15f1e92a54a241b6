"""The CPU scheduling policy of a gateway's processes.

A gateway is a pipeline: the receiver hands a queue message to a worker, the
worker hands replies to the sender, the sender wakes the client.  Under
SCHED_OTHER every such hand-over lets the woken process preempt the one that
is in the middle of its batch, so each process is interrupted before it has
done what would have gone out in one syscall.  SCHED_BATCH (sched(7)) turns
off wakeup preemption and nothing else: when a CPU is idle the woken process
still runs at once.  Measured on 2 cores (N=1000, D=8 and N=10..100, D=1
echo): 10-18 % more replies/s and lower p50 and p99.  The cost is that the
gateway is "mildly disfavored" against interactive processes on a busy host;
``--sched other`` keeps the default policy.  Lowering the policy this way
needs no privilege; children (receiver, sender, workers) inherit it.  A
real-time or idle policy set by whoever started the gateway is left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Final

__all__ = ["POLICIES", "apply"]

POLICIES: Final = {"batch": os.SCHED_BATCH, "other": os.SCHED_OTHER}

log = logging.getLogger("duprep")


def apply(name: str) -> None:
    """Put the calling process under policy ``name`` ("batch" or "other").

    Only SCHED_OTHER and SCHED_BATCH are switched between: a policy chosen
    on purpose by whoever started us (a real-time or idle one, e.g. a unit's
    ``CPUSchedulingPolicy=``) is kept, and so is the current one if the
    switch is refused; both are logged, neither is an error.
    """
    policy = POLICIES[name]
    current = os.sched_getscheduler(0)
    if current == policy:
        return
    if current not in POLICIES.values():
        log.info("keeping scheduling policy %d set by whoever started us (not switching to SCHED_%s)",
                 current, name.upper())
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as e:
        log.warning("cannot switch to SCHED_%s (%s); keeping the current policy", name.upper(), e)
