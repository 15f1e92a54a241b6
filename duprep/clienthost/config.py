"""The client daemon's settings: one frozen Struct, validated once.

Queue sizes are small on purpose: every local endpoint costs
``reply_depth * (reply_size + 96)`` bytes of the user's RLIMIT_MSGQUEUE
(819200 bytes unless raised), which every gateway and client daemon of the
user shares.  Replies larger than ``reply_size`` travel in pieces, so the
size limits no reply; 4 x 1 KiB is 4480 bytes per endpoint: 20 endpoints
cost 90 KB, and they, the uplink (83 KB) and a default gateway (166 KB) fit
together with room for more.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ..config import resolve_port
from ..errors import ConfigError
from ..ipcnames import check_instance
from ..queues import KernelLimits, kernel_limits, plan

__all__ = ["DaemonConfig", "parse_server", "default_sizes"]

Links = Literal["direct", "callback"]


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of one client daemon (``duprep client-daemon --help``)."""

    instance: str = "default"
    server_host: str = "127.0.0.1"
    server_port: int = 2000
    name: str = ""                    # client name at the gateway ("": anonymous)
    links: Links = "direct"           # "callback": the seed's L0 + connect-back L1/L2
    callback_host: str = ""           # address to listen on for callbacks ("": L0's local address)
    uplink_depth: int = 10
    uplink_size: int = 8192
    reply_depth: int = 4
    reply_size: int = 1024
    connect_timeout: float = 5.0      # seconds for name lookup and TCP connect (and, callback mode, the callbacks)
    handshake_timeout: float = 5.0    # seconds from connected to WELCOME
    min_backoff: float = 0.1          # first reconnect delay; doubles up to max_backoff
    max_backoff: float = 5.0
    max_outbuf: int = 1 << 20         # request bytes buffered for the gateway before the uplink pauses
    max_pending: int = 1024           # reply pieces buffered per endpoint whose queue is full
    drain_timeout: float = 5.0        # SIGTERM: seconds to wait for answers already asked for
    orphan_memory: int = 100_000      # msgids of dead processes remembered to count late replies
    late_grace: float = 10.0          # seconds a request is remembered past its timeout, for a late answer
    max_routes: int = 100_000         # requests remembered while unanswered; beyond it the oldest is forgotten

    def __post_init__(self) -> None:
        check_instance(self.instance)
        if not 0 < self.server_port <= 65535:
            raise ConfigError(f"server port {self.server_port} is out of range")
        if len(self.name.encode()) > 64 or not self.name.isprintable():
            raise ConfigError("--name must be printable and at most 64 bytes")
        for field in ("uplink_depth", "reply_depth", "max_pending", "orphan_memory", "max_routes"):
            if getattr(self, field) < 1:
                raise ConfigError(f"{field} must be >= 1")
        for field in ("uplink_size", "reply_size"):
            if getattr(self, field) < 1024:
                raise ConfigError(f"{field} must be >= 1024 bytes")
        for field in ("connect_timeout", "handshake_timeout", "min_backoff", "max_backoff", "drain_timeout",
                      "late_grace"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be > 0")
        if self.max_backoff < self.min_backoff:
            raise ConfigError("max_backoff must be >= min_backoff")

    @property
    def server(self) -> str:
        host = f"[{self.server_host}]" if ":" in self.server_host else self.server_host
        return f"{host}:{self.server_port}"


def parse_server(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; PORT may be an /etc/services name) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port:
        raise ConfigError(f"--server must be HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, resolve_port(port)


def default_sizes(limits: KernelLimits | None = None) -> dict[str, int]:
    """Queue sizes for this kernel.

    The uplink follows the gateway's rule (:func:`duprep.queues.plan`): up
    to 10 messages of up to 64 KiB within 1/8 of RLIMIT_MSGQUEUE, depth
    before size.  A request is never split, so the size bounds it; with the
    default RLIMIT_MSGQUEUE that is 8 KiB even where the sysctls allow more,
    because 2 x 64 KiB ran 15-20 % slower than 10 x 8 KiB (eight local
    processes, echo, 3 pairs).  ``--uplink-size`` takes more.  Reply
    queues, one per local endpoint, are 4 x 1 KiB (larger replies come in
    pieces).
    """
    lim = limits or kernel_limits()
    up = plan(queues=1, share=8, max_depth=10, limits=lim)
    return {"uplink_depth": up.depth, "uplink_size": up.msgsize,
            "reply_depth": min(4, lim.msg_max), "reply_size": min(1024, lim.msgsize_max)}
