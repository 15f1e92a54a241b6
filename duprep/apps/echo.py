"""Echo: the reply is the request's data.  For tests and benchmarks."""

from __future__ import annotations

from ..bus import Request


def handle(request: Request) -> bytes:
    return request.data
