"""Business handlers for the integration tests (imported by worker processes)."""

from __future__ import annotations

import os
import time

import msgspec

from duprep import bus


def handle(request: bus.Request) -> bytes | None:
    """Echo, with a few commands: ``sleep:<seconds>``, ``defer:<dir>``, ``fail``."""
    data = request.data
    if data.startswith(b"sleep:"):
        time.sleep(float(data[6:].split(b"|")[0]))
        return data
    if data.startswith(b"defer:"):
        # Hand the request to whoever answers later: a file another process reads.
        path = os.path.join(data[6:].decode(), f"{request.sid}-{request.msgid}.req")
        with open(path + ".tmp", "wb") as f:
            f.write(msgspec.msgpack.encode(request))
        os.rename(path + ".tmp", path)
        return bus.DEFERRED
    if data == b"fail":
        raise RuntimeError("the handler failed on purpose")
    if data == b"pid":
        return str(os.getpid()).encode()
    if data == b"exit0":
        os._exit(0)                  # a handler that ends its process behind the worker's back
    if data == b"str":
        return "not bytes"  # type: ignore[return-value]      # a handler bug the worker must survive
    return data
