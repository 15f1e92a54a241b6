"""The public exception family.

Three kinds cover nearly everything a caller has to tell apart, as in trio:
``WouldBlock`` (try again later), ``ClosedResourceError`` (you closed this
handle yourself) and ``BrokenResourceError`` (the other side is gone).  The
rest name a specific, documented refusal so that nothing fails silently.
"""

from __future__ import annotations

__all__ = [
    "DuprepError",
    "WouldBlock",
    "ClosedResourceError",
    "BrokenResourceError",
    "ProtocolError",
    "ConfigError",
    "LimitError",
    "InstanceBusyError",
    "Timeout",
    "Deferred",
    "RemoteError",
    "RefusedError",
    "UnknownTarget",
]


class DuprepError(Exception):
    """Base class of every error duprep raises on purpose."""


class WouldBlock(DuprepError):
    """The operation would have to wait and the caller asked it not to."""


class ClosedResourceError(DuprepError):
    """This handle was closed by its owner; it cannot be used any more."""


class BrokenResourceError(DuprepError):
    """The peer (gateway, client or link) went away; the handle is dead."""


class ProtocolError(DuprepError):
    """Bytes on the wire or on a queue do not follow docs/protocol.md."""


class ConfigError(DuprepError):
    """A setting is invalid or the machine cannot provide what it asks for."""


class LimitError(ConfigError):
    """A kernel or process limit stops duprep from creating an IPC object.

    The message names the limit, the bytes or count needed and the fix.
    """


class InstanceBusyError(DuprepError):
    """Another live gateway (or processes attached to it) owns this instance."""


class Timeout(DuprepError, TimeoutError):
    """No answer within the timeout: the seed's "overtime".

    A reply that arrives later is not lost: ``Client.receive()`` returns it
    with ``kind == "late"``.
    """

    def __init__(self, message: str, *, msgid: int = 0) -> None:
        super().__init__(message)
        self.msgid = msgid


class Deferred(DuprepError):
    """The business worker took the request and will answer later.

    The final answer arrives through ``Client.receive()`` with
    ``kind == "deferred"`` and this ``msgid``.
    """

    def __init__(self, message: str, *, msgid: int) -> None:
        super().__init__(message)
        self.msgid = msgid


class RemoteError(DuprepError):
    """The gateway or a business worker answered with an ERROR frame."""

    def __init__(self, message: str, *, code: int, msgid: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.msgid = msgid


class RefusedError(RemoteError, BrokenResourceError):
    """The gateway refused or ended the connection (full, bad hello, ...)."""


class UnknownTarget(RemoteError, LookupError):
    """A relay or push named a client that is not connected."""
