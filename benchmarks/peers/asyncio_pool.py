"""Peer 3, what a Python developer would write today: asyncio + uvloop + a process pool.

What: ``asyncio.start_server`` streams on uvloop; each connection reads frames
in a loop and starts one task per REQUEST that awaits
``loop.run_in_executor(pool, ...)`` on a ``ProcessPoolExecutor`` of K
workers, then writes the REPLY (out of order, as duprep may).  The pool is
started and warmed before the port is announced, so the process count is
stable during the measurements.

Run: python -m benchmarks.peers.asyncio_pool --app echo --workers 2 --port 0
Needs uvloop (benchmarks/requirements.txt); the harness skips this peer
without it.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from benchmarks.apps import HANDLERS, BenchRequest
from benchmarks.peers import common, framing

__all__ = ["main", "run_app"]


def run_app(app: str, data: bytes) -> bytes:
    """Runs in a pool worker: the business function on one payload."""
    return HANDLERS[app](BenchRequest(data)) or b""


class _Server:
    """Per-process state: the pool and the app name."""

    def __init__(self, pool: ProcessPoolExecutor, app: str) -> None:
        self.pool = pool
        self.app = app
        self.sid = 0

    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sid += 1
        tasks: set[asyncio.Task[None]] = set()
        try:
            hello = await _read_frame(reader)
            writer.write(framing.welcome(self.sid, 1, framing.hello_name(hello)))
            while True:
                frame = await _read_frame(reader)
                task = asyncio.create_task(self.serve(frame, writer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, framing.FrameError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            writer.close()

    async def serve(self, frame: list[Any], writer: asyncio.StreamWriter) -> None:
        msgid, cpid, data = framing.request_fields(frame)
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self.pool, run_app, self.app, data)
        except Exception as exc:
            writer.write(framing.error(msgid, cpid, framing.APP_ERROR, f"{type(exc).__name__}: {exc}"))
        else:
            writer.write(framing.reply(msgid, cpid, out))
        if not writer.is_closing():
            await writer.drain()


async def _read_frame(reader: asyncio.StreamReader) -> list[Any]:
    head = await reader.readexactly(4)
    n = int.from_bytes(head, "big")
    if n > framing.MAX_FRAME:
        raise framing.FrameError(f"frame of {n} bytes")
    buf = bytearray(head)
    buf += await reader.readexactly(n)
    frames = framing.split_frames(buf)
    return frames[0]


async def _serve(args: Any, pool: ProcessPoolExecutor) -> None:
    server = _Server(pool, args.app)
    srv = await asyncio.start_server(server.on_client, args.host, args.port, backlog=4096,
                                     family=socket.AF_INET, reuse_address=True)
    common.announce(srv.sockets[0].getsockname()[1])
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> None:
    import uvloop  # imported here so that the harness can detect its absence first

    args = common.peer_args("asyncio + uvloop + ProcessPoolExecutor peer", argv, workers=True)
    common.raise_nofile()
    pool = ProcessPoolExecutor(max_workers=args.workers)
    # Start every worker now (not lazily under load) and run the app once in each.
    for fut in [pool.submit(run_app, "echo", b"warm") for _ in range(args.workers * 4)]:
        fut.result(timeout=60)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(args, pool))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
