"""The gateway's settings: one frozen Struct, validated once, passed to every child.

The acceptor encodes it as JSON on each child's command line, so a receiver,
sender or worker started (or restarted) later sees exactly the same values.
"""

from __future__ import annotations

import socket
from typing import Final

import msgspec

from .errors import ConfigError
from .ipcnames import check_instance

__all__ = ["GatewayConfig", "resolve_port", "min_outbuf", "DEFAULT_APP", "MIN_OUTBUF"]

DEFAULT_APP = "duprep.apps.records:handle"
MIN_OUTBUF: Final = 65536      # bytes: the smallest --max-outbuf, whatever the queue message size
MAX_SECONDS: Final = 86400      # the longest timeout or interval an option takes (epoll's limit is ~24 days)


def min_outbuf(msgsize: int) -> int:
    """The smallest ``max_outbuf`` for queue messages of ``msgsize`` bytes.

    The sender drops a relayed PUSH that would take a connection's unwritten
    bytes above ``max_outbuf // 2``, and ends a connection that keeps more than
    ``max_outbuf`` unwritten: at twice the message size (which bounds every
    frame) the largest relay still fits an empty buffer and a reply never
    cuts a client off by itself.  Below 64 KiB a client reading at a normal
    pace would be cut off, so that is the floor.
    """
    return max(MIN_OUTBUF, 2 * msgsize)


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of one gateway instance (``duprep serve --help`` documents them)."""

    instance: str = "default"
    host: str = "127.0.0.1"
    port: int = 2000
    workers: int = 2
    app: str | None = DEFAULT_APP
    max_clients: int = 4096
    max_per_ip: int = 0                 # 0: no limit
    queue_depth: int | None = None      # None: what the kernel offers (queues.plan)
    queue_size: int | None = None
    handshake_timeout: float = 5.0      # seconds from accept to HELLO
    max_outbuf: int = 1 << 20           # reply bytes buffered per connection before SLOW_CONSUMER
    write_timeout: float = 30.0         # seconds a connection may block our writes
    keepalive: float = 60.0             # seconds of silence before TCP keepalive probes (0: kernel default)
    sndbuf: int = 65536                 # SO_SNDBUF of client sockets (0: kernel default)
    drain_timeout: float = 10.0         # seconds SIGTERM waits for queued replies
    heartbeat: float = 30.0             # seconds between heartbeats of an idle process (busy ones beat as they work)
    hang_timeout: float = 120.0         # a process silent this long is killed and replaced (0: never)
    backlog: int = 1024
    links: str = "direct"               # "callback": also accept CALLME (the seed's L0 + L1/L2)
    sched: str = "batch"                # CPU policy of every gateway process (duprep/sched.py); "other"

    def __post_init__(self) -> None:
        check_instance(self.instance)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range")
        if self.workers < 0 or self.workers > 60:
            raise ConfigError("--workers must be between 0 and 60")
        if not 1 <= self.max_clients <= 1_000_000:
            raise ConfigError("--max-clients must be between 1 and 1000000")
        if self.max_per_ip < 0:
            raise ConfigError("--max-per-ip must be >= 0 (0 means no limit)")
        if self.links not in ("direct", "callback"):
            raise ConfigError("--links must be 'direct' or 'callback'")
        if self.sched not in ("batch", "other"):
            raise ConfigError("--sched must be 'batch' or 'other'")
        for name in ("handshake_timeout", "write_timeout", "drain_timeout", "heartbeat", "hang_timeout"):
            value = getattr(self, name)
            if not value <= MAX_SECONDS:       # (also NaN) epoll and timers take at most ~24 days
                raise ConfigError(f"--{name.replace('_', '-')} must be at most {MAX_SECONDS} seconds")
            if value <= 0 and name != "hang_timeout":
                raise ConfigError(f"{name} must be > 0")
        if not (self.keepalive == 0 or 1 <= self.keepalive <= 32767):
            raise ConfigError("--keepalive must be 0 (the kernel's settings) or 1 to 32767 seconds")
        self.check_outbuf(self.queue_size or 0)
        if self.hang_timeout < 0:
            raise ConfigError("--hang-timeout must be >= 0 (0: never)")
        if self.hang_timeout and self.hang_timeout < 2 * self.heartbeat:
            raise ConfigError(f"--hang-timeout must be 0 (never) or at least twice --heartbeat "
                              f"({2 * self.heartbeat:g} s): an idle process shows life only once per heartbeat")

    def check_outbuf(self, msgsize: int) -> None:
        """Raise ConfigError if ``max_outbuf`` is below :func:`min_outbuf` for queue messages of
        ``msgsize`` bytes (0: not known yet; the acceptor checks again once it has sized its queues)."""
        least = min_outbuf(msgsize)
        if self.max_outbuf < least:
            why = f" (twice the queue message size, {msgsize} bytes)" if least > MIN_OUTBUF else ""
            raise ConfigError(f"--max-outbuf must be at least {least} bytes{why}, got {self.max_outbuf}: "
                              f"relayed messages are dropped above half of it, and a client with more "
                              f"unwritten bytes is cut off")

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str) -> "GatewayConfig":
        return msgspec.json.decode(text, type=cls)


def resolve_port(value: str) -> int:
    """A port number, or a service name from /etc/services (the seed's getservbyname)."""
    if value.isdigit():
        return int(value)
    try:
        return socket.getservbyname(value, "tcp")
    except OSError:
        raise ConfigError(f"unknown service {value!r}: not a port number and not in /etc/services") from None
