"""Start and stop duprep services as child processes, waiting for readiness the systemd way.

The child gets ``NOTIFY_SOCKET`` pointing at a datagram socket we own and
says ``READY=1`` when it is ready, exactly as it would to systemd; we wait on
that socket and on the child's pidfd (so a child that dies ends the wait at
once).  Nothing here polls or sleeps.  Used by ``duprep demo``, the tests,
the benchmarks, and :mod:`duprep.clienthost.launch`.
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

__all__ = ["ServiceProcess", "GatewayProcess", "start_service", "start_gateway"]


class ServiceProcess:
    """A running duprep service child (gateway or client daemon)."""

    def __init__(self, proc: subprocess.Popen[bytes], instance: str) -> None:
        self.proc = proc
        self.instance = instance

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

    def kill(self) -> int:
        """SIGKILL (a crash, for tests of the cleanup after one)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> "ServiceProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GatewayProcess(ServiceProcess):
    """A running ``duprep serve`` child; ``port`` is the port it listens on."""

    def __init__(self, proc: subprocess.Popen[bytes], instance: str, port: int) -> None:
        super().__init__(proc, instance)
        self.port = port


def start_service(argv: Sequence[str], what: str, *, timeout: float = 30.0, env: dict[str, str] | None = None,
                  stderr: int | None = None) -> subprocess.Popen[bytes]:
    """Run ``python -m duprep ARGV...`` and return once it has said READY=1.

    Raises Timeout, or BrokenResourceError if it exits first; the child is
    killed in both cases.
    """
    tmp = tempfile.mkdtemp(prefix="duprep-notify-")
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc = None
    try:
        sock.bind(path)
        child_env = dict(os.environ if env is None else env)
        child_env["NOTIFY_SOCKET"] = path
        proc = subprocess.Popen([sys.executable, "-m", "duprep", *argv], env=child_env, stdin=subprocess.DEVNULL,
                                stderr=stderr)
        pidfd = os.pidfd_open(proc.pid)
        try:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{what} not ready within {timeout:g} s")
                ready, _, _ = select.select([sock.fileno(), pidfd], [], [], left)
                if sock.fileno() in ready:
                    if "READY=1" in sock.recv(4096).decode().split("\n"):
                        return proc
                elif pidfd in ready:
                    raise BrokenResourceError(f"{what} exited with code {proc.wait()} before it was ready")
        finally:
            os.close(pidfd)
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


def start_gateway(instance: str, *, args: Sequence[str] = (), timeout: float = 30.0,
                  env: dict[str, str] | None = None, stderr: int | None = None) -> GatewayProcess:
    """Run ``duprep serve --instance INSTANCE --port 0 ARGS...`` and wait until it is ready."""
    ipcnames.check_instance(instance)
    proc = start_service(["serve", "--instance", instance, "--port", "0", *args], f"gateway {instance}",
                         timeout=timeout, env=env, stderr=stderr)
    try:
        table = Table.attach(ipcnames.table_name(instance))
        try:
            port = table.get("port")
        finally:
            table.close()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return GatewayProcess(proc, instance, port)
