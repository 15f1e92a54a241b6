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
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from .. import ipcnames
from ..errors import BrokenResourceError, Timeout
from .control import fetch

__all__ = ["DaemonProcess", "start_daemon"]


class DaemonProcess:
    """A running ``duprep client-daemon`` child."""

    def __init__(self, proc: subprocess.Popen[bytes], instance: str) -> None:
        self.proc = proc
        self.instance = instance

    @property
    def pid(self) -> int:
        return self.proc.pid

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

    def stop(self, *, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> int:
        """SIGKILL (a crash, for tests of the cleanup after one)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_daemon(instance: str, server: str, *, args: Sequence[str] = (), timeout: float = 30.0,
                 env: dict[str, str] | None = None, stderr: int | None = None) -> DaemonProcess:
    """Run ``duprep client-daemon --instance INSTANCE --server SERVER ARGS...``; wait until ready."""
    ipcnames.check_instance(instance)
    tmp = tempfile.mkdtemp(prefix="duprep-notify-")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc = None
    try:
        sock.bind(path)
        child_env = dict(os.environ if env is None else env)
        child_env["NOTIFY_SOCKET"] = path
        argv = [sys.executable, "-m", "duprep", "client-daemon", "--instance", instance, "--server", server, *args]
        proc = subprocess.Popen(argv, env=child_env, stdin=subprocess.DEVNULL, stderr=stderr)
        pidfd = os.pidfd_open(proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"client daemon {instance} not ready within {timeout:g} s")
                ready, _, _ = select.select([sock.fileno(), pidfd], [], [], left)
                if sock.fileno() in ready:
                    if "READY=1" in sock.recv(4096).decode().split("\n"):
                        break
                elif pidfd in ready:
                    raise BrokenResourceError(
                        f"client daemon {instance} exited with code {proc.wait()} before it was ready")
        finally:
            os.close(pidfd)
        return DaemonProcess(proc, instance)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        os.rmdir(tmp)
