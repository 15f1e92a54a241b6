"""Start and stop a client daemon as a child process, ready the systemd way.

Like :func:`duprep.launch.start_gateway`: the child gets ``NOTIFY_SOCKET``
pointing at a datagram socket we own and says ``READY=1`` once its uplink
queue exists and local processes can attach (the link to the gateway may
still be connecting: :meth:`DaemonProcess.wait_link` waits for that).
Nothing here sleeps: it waits on the notify socket and the child's pidfd.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any, Sequence

from .. import ipcnames
from ..errors import BrokenResourceError, Timeout
from ..launch import ServiceProcess, start_service
from .control import fetch

__all__ = ["DaemonProcess", "start_daemon"]


class DaemonProcess(ServiceProcess):
    """A running ``duprep client-daemon`` child."""

    def status(self, *, timeout: float = 5.0) -> dict[str, Any]:
        """The daemon's status document (what ``duprep client-status --json`` prints)."""
        return fetch(self.instance, timeout=timeout)

    def wait_link(self, state: str = "up", *, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until the link is in ``state``; return that status.  Raises Timeout."""
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(self.pid)
        try:
            while True:
                snap = self.status()
                if snap["link"]["state"] == state:
                    return snap
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"client daemon link not {state} within {timeout:g} s: {snap['link']}")
                # No event announces a link change to outsiders: ask again after
                # 50 ms, waiting on the pidfd so that a dying daemon ends the wait.
                if select.select([pidfd], [], [], min(left, 0.05))[0]:
                    raise BrokenResourceError(f"client daemon exited with code {self.proc.wait()}")
        finally:
            os.close(pidfd)


def start_daemon(instance: str, server: str, *, args: Sequence[str] = (), timeout: float = 30.0,
                 env: dict[str, str] | None = None, stderr: int | None = None) -> DaemonProcess:
    """Run ``duprep client-daemon --instance INSTANCE --server SERVER ARGS...``; wait until ready."""
    ipcnames.check_instance(instance)
    proc = start_service(["client-daemon", "--instance", instance, "--server", server, *args],
                         f"client daemon {instance}", timeout=timeout, env=env, stderr=stderr)
    return DaemonProcess(proc, instance)
