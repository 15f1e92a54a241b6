"""Start and stop a gateway as a child process, waiting for readiness the systemd way.

The child gets ``NOTIFY_SOCKET`` pointing at a datagram socket we own and
says ``READY=1`` when it accepts connections, exactly as it would to
systemd; nothing here polls or sleeps.  Used by ``duprep demo``, the tests
and the benchmarks.
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
from typing import Sequence

from . import ipcnames
from .errors import BrokenResourceError, Timeout
from .table import Table

__all__ = ["GatewayProcess", "start_gateway"]


class GatewayProcess:
    """A running ``duprep serve`` child."""

    def __init__(self, proc: subprocess.Popen[bytes], instance: str, port: int) -> None:
        self.proc = proc
        self.instance = instance
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, *, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_gateway(instance: str, *, args: Sequence[str] = (), timeout: float = 30.0,
                  env: dict[str, str] | None = None, stderr: int | None = None,
                  new_session: bool = False) -> GatewayProcess:
    """Run ``duprep serve --instance INSTANCE --port 0 ARGS...`` and wait until it is ready.

    ``new_session`` puts the gateway in its own session and process group, so
    that ``os.killpg(gw.pid, ...)`` reaches every process of it.
    """
    ipcnames.check_instance(instance)
    path = os.path.join(tempfile.mkdtemp(prefix="duprep-notify-"), "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc = None
    try:
        sock.bind(path)
        child_env = dict(os.environ if env is None else env)
        child_env["NOTIFY_SOCKET"] = path
        argv = [sys.executable, "-m", "duprep", "serve", "--instance", instance, "--port", "0", *args]
        proc = subprocess.Popen(argv, env=child_env, stdin=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=new_session)
        pidfd = os.pidfd_open(proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"gateway {instance} not ready within {timeout:g} s")
                ready, _, _ = select.select([sock, pidfd], [], [], left)
                if sock in ready:
                    if "READY=1" in sock.recv(4096).decode().split("\n"):
                        break
                elif pidfd in ready:
                    raise BrokenResourceError(
                        f"gateway {instance} exited with code {proc.wait()} before it was ready")
        finally:
            os.close(pidfd)
        table = Table.attach(ipcnames.table_name(instance))
        try:
            port = table.get("port")
        finally:
            table.close()
        return GatewayProcess(proc, instance, port)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        sock.close()
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass
