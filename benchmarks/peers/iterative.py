"""Peer 2, the seed's "general duplicate" server: connect, one request, close.

What: one process, an iterative accept loop; for each connection it reads
HELLO and one REQUEST, writes WELCOME and the REPLY, and closes (the server
closes first, so TIME_WAIT stays on the server side and the load generator's
ephemeral ports are not exhausted).  A client that stalls is cut off after a
short socket timeout so it cannot block the loop forever.  The load generator
drives it in connect-per-request mode; clients queue in the listen backlog.

Run: python -m benchmarks.peers.iterative --app echo --port 0
"""

from __future__ import annotations

import socket
from typing import Any

from benchmarks.peers import common, framing

__all__ = ["main", "serve_one"]

CLIENT_TIMEOUT = 5.0    # seconds a single client may take


def serve_one(conn: socket.socket, handler: framing.Handler, sid: int) -> None:
    """HELLO + one REQUEST in, WELCOME + REPLY out."""
    buf = bytearray()
    frames: list[list[Any]] = []
    while len(frames) < 2:
        chunk = conn.recv(65536)
        if not chunk:
            return
        buf += chunk
        frames += framing.split_frames(buf)
    out = framing.welcome(sid, 1, framing.hello_name(frames[0]))
    conn.sendall(out + framing.answer_request(handler, frames[1]))


def main(argv: list[str] | None = None) -> None:
    args = common.peer_args("iterative connect-per-request peer", argv)
    common.raise_nofile()
    handler = common.handler_for(args.app)
    ls = common.listen(args.host, args.port)
    common.announce(ls.getsockname()[1])
    sid = 0
    while True:
        conn, _ = ls.accept()
        sid += 1
        try:
            conn.settimeout(CLIENT_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            serve_one(conn, handler, sid)
        except (OSError, framing.FrameError):
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    main()
