"""duprep: a duplicate-server gateway.

Three processes hold every client's TCP connection; POSIX message queues
carry requests to Python business workers (:mod:`duprep.bus`) and replies
back.  :class:`Client` talks to a gateway; ``duprep serve`` runs one.
"""

from __future__ import annotations

from .client import Client, Message
from .errors import (BrokenResourceError, ClosedResourceError, ConfigError, Deferred, DuprepError,
                     InstanceBusyError, LimitError, ProtocolError, RefusedError, RemoteError, Timeout,
                     UnknownTarget, WouldBlock)

__version__ = "0.1.0"

__all__ = [
    "Client", "Message", "DuprepError", "WouldBlock", "ClosedResourceError", "BrokenResourceError",
    "ProtocolError", "ConfigError", "LimitError", "InstanceBusyError", "Timeout", "Deferred",
    "RemoteError", "RefusedError", "UnknownTarget", "__version__",
]
