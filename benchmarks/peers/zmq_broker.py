"""Peer 4, the messaging design: a pyzmq ROUTER/DEALER broker with K workers.

What: the broker binds a ROUTER on TCP for clients and a DEALER on an ipc://
endpoint in the run directory for workers, and runs ``zmq.proxy`` between
them (all in libzmq's C code).  K worker processes (forked before any zmq
context exists) each hold a DEALER connected to the backend; a client message
arrives there as [client identity, body], where body is the same msgpack
REQUEST array as on duprep's wire, and the worker answers [identity, REPLY].
Clients are DEALER sockets: the load generator speaks ZMTP 3.0 for them, so
this peer has no HELLO/WELCOME and no length prefix (ZMTP frames instead).

Every socket has its high-water marks off (0: no limit).  ``zmq.proxy``
forwards in one thread with blocking sends: with libzmq's default of 1,000
messages per pipe, a closed loop with more requests in flight than the
workers' pipes hold (N=1000, D=8 and one worker; N=5000, D=8 and two)
blocks the proxy on the backend while the workers block sending replies to
it, and the peer deadlocks with nothing answered.  In-flight requests are
bounded by the load (N x D), so unlimited queues stay bounded here.

Run: python -m benchmarks.peers.zmq_broker --app echo --workers 2 --rundir DIR
Needs pyzmq (benchmarks/requirements.txt); the harness skips it without.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import msgspec

from benchmarks.peers import common, framing
from benchmarks.servers import term_with_parent

__all__ = ["main", "worker"]


def _unlimited(sock: Any) -> None:
    """No high-water marks (see the module docstring: the proxy deadlocks with them)."""
    import zmq

    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)


def worker(backend: str, app: str) -> None:
    """Serve requests from the broker forever (a worker process)."""
    import zmq

    handler = common.handler_for(app)
    decoder = msgspec.msgpack.Decoder()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    _unlimited(sock)
    sock.connect(backend)
    while True:
        ident, body = sock.recv_multipart()
        try:
            frame = decoder.decode(body)
            out = framing.answer_request(handler, frame)
        except (ValueError, framing.FrameError, TypeError, IndexError):
            continue                      # not a request: drop, as a broker would
        sock.send_multipart([ident, out[4:]], copy=False)   # strip the length prefix


def main(argv: list[str] | None = None) -> None:
    import zmq

    args = common.peer_args("pyzmq ROUTER/DEALER broker peer", argv, workers=True)
    common.raise_nofile()
    backend = f"ipc://{os.path.abspath(args.rundir)}/zmq-backend.{os.getpid()}"
    for _ in range(args.workers):
        if os.fork() == 0:
            code = 0
            try:
                term_with_parent()        # a worker must not outlive its broker
                worker(backend, args.app)
            except BaseException:          # noqa: BLE001 - a worker ends only by signal
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
    ctx: Any = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    _unlimited(frontend)
    frontend.bind(f"tcp://{args.host}:{args.port}")
    endpoint = frontend.getsockopt(zmq.LAST_ENDPOINT).decode()
    back = ctx.socket(zmq.DEALER)
    _unlimited(back)
    back.bind(backend)
    common.announce(int(endpoint.rsplit(":", 1)[1]))
    zmq.proxy(frontend, back)


if __name__ == "__main__":
    main()
