"""Peer 1, the seed's "parallel" server: one forked process per connection.

What: the parent accepts and forks; the child speaks the framing on its one
blocking socket (HELLO, then REQUESTs answered in order, pipelined requests
answered in one write) and exits when the client closes.  Children are reaped
by the kernel (SIGCHLD ignored, as in the seed).  This is what the seed paper
calls a concurrent server: every client costs a whole Python process.

Run: python -m benchmarks.peers.forking --app echo --port 0
Stop: SIGTERM to the process group (the harness does that).
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from benchmarks.peers import common, framing

__all__ = ["main", "serve_connection"]


def serve_connection(conn: socket.socket, handler: framing.Handler, sid: int) -> None:
    """Serve one client until it closes; raises on protocol or socket errors."""
    buf = bytearray()
    hello = False
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return
        buf += chunk
        out: list[bytes] = []
        for frame in framing.split_frames(buf):
            if not hello:
                out.append(framing.welcome(sid, 1, framing.hello_name(frame)))
                hello = True
            else:
                out.append(framing.answer_request(handler, frame))
        if out:
            conn.sendall(b"".join(out))


def main(argv: list[str] | None = None) -> None:
    args = common.peer_args("fork-per-connection peer", argv)
    common.raise_nofile()
    handler = common.handler_for(args.app)
    ls = common.listen(args.host, args.port)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    common.announce(ls.getsockname()[1])
    sid = 0
    while True:
        conn, _ = ls.accept()
        sid += 1
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                ls.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                serve_connection(conn, handler, sid)
            except (OSError, framing.FrameError):
                status = 1
            finally:
                sys.stdout.flush()
                os._exit(status)
        conn.close()


if __name__ == "__main__":
    main()
