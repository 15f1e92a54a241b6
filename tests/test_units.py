"""Unit tests of the pieces: frames, framing, table, queues, fd passing, config, loop, locks."""

from __future__ import annotations

import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time

import msgspec
import pytest

from duprep import fdpass, frame, ipcnames, queues, recovery
from duprep.clienthost.routes import Routes
from duprep.config import GatewayConfig, resolve_port
from duprep.errors import ConfigError, InstanceBusyError, LimitError, ProtocolError, WouldBlock
from duprep.frame import ErrorCode
from duprep.gateway.loop import READ, EventLoop
from duprep.lock import InstanceLock, rows_held
from duprep.table import ProcRow, Role, SlotState, Table
from duprep.wire import FrameReader, FrameTooLarge

from .conftest import ROOT


# --- frames ---------------------------------------------------------------------

def test_wire_frames_round_trip_with_length_prefix():
    dec = frame.client_decoder()
    for f in (frame.Hello(1, "alice"), frame.Call(1, 42, 20000, b"hi"), frame.Send(2, 3, b""),
              frame.Relay(5, 6, "bob", b"\x00\xff")):
        data = frame.encode_wire(f)
        assert struct.unpack(">I", data[:4])[0] == len(data) - 4
        assert dec.decode(data[4:]) == f
    sdec = frame.server_decoder()
    for f in (frame.Welcome(1, 3, 4, "n", 8000), frame.Reply(1, 2, b"x"), frame.Defer(1, 2),
              frame.Push(0, "alice", b"y"), frame.Error(0, 0, 5, "taken")):
        assert sdec.decode(frame.encode_wire(f)[4:]) == f


def test_run_handler_encodes_a_reply_tuple_to_the_bytes_of_the_reply_struct():
    """bus.run_handler encodes (REPLY_TAG, msgid, cpid, data), not a Reply: the bytes must be the same."""
    from duprep import bus
    enc = msgspec.msgpack.Encoder().encode
    for msgid, cpid, data in ((1, 0, b""), (2**64 - 1, 2**64 - 1, b"x" * 70000), (127, 128, b"\x00\xff")):
        assert enc((bus.REPLY_TAG, msgid, cpid, data)) == enc(frame.Reply(msgid, cpid, data))


def test_known_encoding_of_a_request_is_stable():
    # [2, 1, 42, 20000, b"hi"]: fixarray 5, tag, fixint, fixint, uint16, bin8
    assert frame.encode_wire(frame.Call(1, 42, 20000, b"hi")).hex() == "0000000b9502012acd4e20c4026869"


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x95\x02\x01", b"\x95\x63\x01\x01\x01\xc4\x00",       # empty, reserved byte, short, bad tag
    b"\x92\x01\xff", b"\x93\x01\x01\xa1\xff",                               # wrong type, invalid UTF-8
    b"\x95\x02\xff\x01\x01\xc4\x00", b"\x94\x02\x01\x01\x01",            # negative id, missing field
    b"\x91" * 2000,                                                           # deep nesting
])
def test_client_decoder_rejects_bad_bodies(body):
    with pytest.raises((msgspec.DecodeError, ValueError, RecursionError)):
        frame.client_decoder().decode(body)


def test_extra_trailing_fields_are_ignored_for_forward_compatibility():
    assert frame.client_decoder().decode(b"\x96\x02\x01\x01\x01\xc4\x00\x07") == frame.Call(1, 1, 1, b"")


def test_names_longer_than_64_are_rejected():
    with pytest.raises(msgspec.ValidationError):
        frame.client_decoder().decode(frame.encode_wire(frame.Hello(1, "x" * 65))[4:])


def test_batch_packer_respects_the_message_size():
    packer = frame.BatchPacker(1024)
    items = [frame.Chunk(i, 1, "c", 1.5, os.urandom(100)) for i in range(50)]
    for it in items:
        packer.add(it)
    messages = packer.take()
    assert len(messages) > 1 and all(len(m) <= 1024 for m in messages)
    assert [r for m in messages for r in frame.decode_requests(m)] == items
    assert not packer and packer.take() == []
    with pytest.raises(ValueError):
        packer.add(frame.Chunk(1, 1, "", 0.0, b"x" * 2000))


def test_batch_packer_says_when_a_message_is_full_and_hands_over_only_full_ones():
    """The receiver puts a full message while it reads on (Receiver.send_full): add() must say when
    one filled up, and take_full() must leave the open message alone."""
    packer = frame.BatchPacker(1024)
    items = [frame.Chunk(i, 1, "c", 1.5, os.urandom(100)) for i in range(50)]
    sealed_at = [i for i, it in enumerate(items) if packer.add(it, count=1)]
    assert sealed_at and sealed_at[0] > 1          # the first adds fit, then one does not
    full = packer.take_full()
    assert len(full) == len(sealed_at) and all(len(m) <= 1024 for m, _ in full)
    assert packer.take_full() == []
    rest = packer.take_counted()                  # the open message, still there
    assert len(rest) == 1
    got = [c for m, _ in full + rest for c in frame.decode_requests(m)]
    assert got == items and sum(n for _, n in full + rest) == 50


def _chunk(sid: int, bodies: list[bytes], client: str = "", received: float = 100.0) -> frame.Chunk:
    return frame.Chunk(sid, 7, client, received, frame.array_header(len(bodies)) + b"".join(bodies))


def test_decode_chunks_makes_requests_in_one_pass():
    enc = msgspec.msgpack.encode
    packer = frame.BatchPacker(8192)
    packer.add(_chunk(1, [enc(frame.Call(i, 9, 1500 * i, b"%d" % i)) for i in range(20)], "alice"))
    packer.add(_chunk(2, [enc(frame.Send(5, 9, b"one-way")), enc(frame.Call(6, 9, 0, b"x"))]))
    [message] = packer.take()
    [(c1, r1), (c2, r2)] = frame.decode_chunks(message)
    assert (c1.sid, c2.sid) == (1, 2)
    assert [(r.msgid, r.data, r.sid, r.generation, r.client) for r in r1] == \
        [(i, b"%d" % i, 1, 7, "alice") for i in range(20)]
    assert r1[0].deadline == 0.0 and r1[2].deadline == 100.0 + 3.0
    assert [type(r) for r in r2] == [frame.Request, frame.Request]
    assert (r2[0].oneway, r2[0].data, r2[0].sid, r2[1].oneway) == (True, b"one-way", 2, False)


def test_decode_chunks_never_lets_a_frame_choose_the_fields_the_gateway_fills():
    """A REQUEST with extra elements decodes into Request's later fields (origin, oneway).
    The receiver forwards only the exact 5-element shape; decode_chunks overwrites the origin anyway
    (a 7th element could only make the client's own REQUEST one-way, as a SEND does)."""
    spoof = b"\x96\x02\x01\x09\x00\xc4\x01x\x94\x00\x00\xa5admin\xcb" + struct.pack(">d", 1.0)
    forged = msgspec.msgpack.decode(spoof, type=frame.Request)
    assert (forged.client, forged.origin.received, forged.oneway) == ("admin", 1.0, False)    # what it would do
    for client in ("", "bob"):
        [(_, [r])] = frame.decode_chunks(_pack(_chunk(1, [spoof], client)))
        assert (r.client, r.deadline, r.oneway, r.sid, r.generation) == (client, 0.0, False, 1, 7)


def _pack(chunk: frame.Chunk) -> bytes:
    packer = frame.BatchPacker(8192)
    packer.add(chunk)
    [message] = packer.take()
    return message


@pytest.mark.parametrize("bad, served", [
    (b"\x95\x02\xff\x00\x00\xc4\x00", [1, 2]),         # a value out of range
    (b"\x94\x02\x01\x02\x03", [1, 2]),                 # a REQUEST of four elements
    (b"\x95\x02\x01\x02\x03\xc4\x00\xc0", []),           # an extra value: the array no longer adds up
    (b"\x95\x02\x01", []),                             # truncated: where the next frame starts is lost
])
def test_decode_chunks_isolates_a_malformed_frame(bad, served):
    """Frames before a bad one still become Requests when they can be told apart; the rest of that
    Chunk is dropped and counted; other Chunks (other connections) are not affected."""
    enc = msgspec.msgpack.encode
    packer = frame.BatchPacker(8192)
    packer.add(_chunk(1, [enc(frame.Call(1, 0, 0, b"a")), enc(frame.Call(2, 0, 0, b"b")), bad,
                          enc(frame.Call(3, 0, 0, b"c"))]))
    packer.add(_chunk(2, [enc(frame.Call(4, 0, 0, b"d"))]))
    [message] = packer.take()
    [(_, first), (_, second)] = frame.decode_chunks(message)
    assert isinstance(first, frame.BadFrame) and "malformed frame" in first.reason
    assert [r.msgid for r in first.requests] == served and len(served) + first.dropped == 4
    assert [r.msgid for r in second] == [4]


def test_batch_packer_large_counts_use_array16():
    packer = frame.BatchPacker(1 << 20)
    for i in range(40):
        packer.add(frame.Close(i, 1))
    [m] = packer.take()
    assert m[0] == 0xDC and len(frame.decode_replies(m)) == 40


# --- framing ----------------------------------------------------------------------

def test_frame_reader_splits_any_chunking():
    frames = [frame.encode_wire(frame.Call(i, 1, 0, os.urandom(i * 7))) for i in range(20)]
    stream = b"".join(frames)
    for step in (1, 3, 7, 64, len(stream)):
        reader, out = FrameReader(10_000), []
        for i in range(0, len(stream), step):
            out += [bytes(b) for b in reader.feed(stream[i:i + step])]
        assert out == [f[4:] for f in frames]
        assert reader.buffered == 0


def test_frame_reader_refuses_oversized_before_reading_the_body():
    reader = FrameReader(100)
    with pytest.raises(FrameTooLarge):
        reader.feed(struct.pack(">I", 101))
    assert isinstance(FrameTooLarge("x"), ProtocolError)


# --- table ---------------------------------------------------------------------------

@pytest.fixture
def table(instance):
    t = Table.create(ipcnames.table_name(instance), nslots=8, nprocs=8, epoch=7, host="127.0.0.1", port=5)
    yield t
    t.close()
    t.unlink()


def test_table_header_and_slot_parts(table, instance):
    assert table.header()["epoch"] == 7 and table.get("port") == 5 and table.header()["host"] == "127.0.0.1"
    table.set("port", 4242)
    assert table.get("port") == 4242
    assert list(table.slots()) == []
    table.a_part(3).write(2, SlotState.OPEN, 999, 1.0, b"10.0.0.1")
    table.r_part(3).write(2, 1, 0, 2.0, 5, 50, b"alice")
    table.s_part(3).write(1, 0, 0, 3.0, 9, 90, 0, 0)            # stale generation: ignored
    [info] = table.slots()
    assert (info.sid, info.generation, info.name, info.addr, info.frames_in) == (3, 2, "alice", "10.0.0.1", 5)
    assert info.frames_out == 0
    assert table.find_name("alice") == (3, 2) and table.find_name("bob") is None
    other = Table.attach(ipcnames.table_name(instance))
    assert other.slot(3) == info
    other.close()


def test_attaching_process_exit_does_not_unlink(table, instance):
    code = ("import sys; sys.path.insert(0, %r); from duprep.table import Table; "
            "t = Table.attach(%r); t.close()") % (ROOT, ipcnames.table_name(instance))
    subprocess.run([sys.executable, "-c", code], check=True)
    Table.attach(ipcnames.table_name(instance)).close()     # still there


def test_proc_rows(table):
    row = ProcRow(table, 1, Role.RECEIVER)
    row.counters[0] = 11
    row.beat()
    [p] = table.procs()
    assert p.role == "receiver" and p.pid == os.getpid() and p.counters["frames_in"] == 11


def test_the_hang_check_takes_the_newest_sign_of_life_and_says_when_to_look_again(instance):
    """hangs.overdue: a row's heartbeat counts; a process without a row is not judged; only processes
    asked about; the next check is when the first of the others could be overdue."""
    from duprep import hangs
    from duprep.table import NCOUNTERS
    t = Table.create(ipcnames.table_name(instance), nslots=8, nprocs=8, epoch=7, heartbeat=1.0, hang_timeout=10.0)
    try:
        assert (t.get("heartbeat"), t.get("hang_timeout")) == (1.0, 10.0)
        for row, pid, beat in ((1, 101, 95.0), (2, 102, 80.0), (3, 103, 99.0), (4, 999, 0.0)):
            t.proc_part(row).write(pid, Role.WORKER, 0, 0, 0, 0.0, beat, *[0] * NCOUNTERS)
        late, next_check = hangs.overdue(t, [101, 102, 103, 104], 10.0, now=100.0)
        assert late == {102: 20.0}               # 101 beat at 95, 103 at 99; 104 has no row yet: not judged
        assert next_check == 105.0               # 101: 95 + 10
        late, next_check = hangs.overdue(t, [104], 10.0, now=100.0)
        assert (late, next_check) == ({}, 110.0)
        # 102's row was begun (time.time() 0.0) long before this process 102 was spawned (at 500.0): it is
        # an earlier process's that had the same pid, so this one has no row yet and is not judged.
        assert hangs.overdue(t, [102], 10.0, now=100.0, spawned={102: 500.0}) == ({}, 110.0)
        assert hangs.overdue(t, [102], 10.0, now=100.0, spawned={102: 0.5})[0] == {102: 20.0}
    finally:
        t.close()
        t.unlink()


def test_a_published_counter_is_never_seen_half_written(instance):
    """ProcRow.publish_counter writes outside the seqlock, so it must be one 8-byte store: with
    struct.pack_into a reader saw 0 between two large values (a receiver killed there would leave its
    successor counting from 0)."""
    t = Table.create(ipcnames.table_name(instance), nslots=8, nprocs=8, epoch=7)
    try:
        row = ProcRow(t, 1, Role.RECEIVER)
        code = ("import sys; sys.path.insert(0, %r)\n"
                "from duprep import ipcnames\nfrom duprep.table import Table\n"
                "t = Table.attach(ipcnames.table_name(%r)); seen = 0; bad = 0\n"
                "for _ in range(200000):\n"
                "    v = t.proc_part(1).read_own()[7 + 3]\n"
                "    bad += v < seen; seen = max(seen, v)\n"
                "t.close(); print(bad, seen)\n") % (ROOT, instance)
        reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        value = 0x1_0000_0000
        while reader.poll() is None:
            value += 0x1_0101_0101
            row.counters[3] = value
            row.publish_counter(3)
        bad, seen = map(int, reader.stdout.read().split())     # type: ignore[union-attr]
        assert reader.returncode == 0 and seen > 0x1_0000_0000
        assert bad == 0, f"{bad} reads went backwards (a half-written counter)"
    finally:
        t.close()
        t.unlink()


def test_a_dead_workers_hand_is_answered_once_from_the_first_unanswered_request(instance):
    """take_over: ERROR WORKER_LOST for each REQUEST of the message in hand from ``answered`` on,
    grouped per connection; SENDs only counted; the row's counters add up again; done only once."""
    t = Table.create(ipcnames.table_name(instance), nslots=8, nprocs=8, epoch=7, msgsize=8192)
    try:
        row = ProcRow(t, 4, Role.WORKER, index=1)
        row.counters[:6] = [10, 9, 0, 3, 4, 0]          # requests replies errors qmsgs held lost
        row.beat()
        a = [frame.Call(1, 7, 0, b"a1"), frame.Send(2, 7, b"a2"), frame.Call(3, 7, 0, b"a3")]
        b = [frame.Call(4, 8, 0, b"b1")]

        def chunk(sid, frames):
            bodies = [msgspec.msgpack.encode(f) for f in frames]
            return frame.Chunk(sid, 100 + sid, "", 1.0, frame.array_header(len(bodies)) + b"".join(bodies))
        message = msgspec.msgpack.encode([chunk(1, a), chunk(2, b)])
        assert [r.msgid for r in recovery.requests_of(message)] == [1, 2, 3, 4]
        assert recovery.take_over(t, 4) is None                      # nothing in hand
        hand = t.in_hand(4)
        hand.hold(message, 10)                                       # the row had counted 10 before it
        hand.answered(1)                                             # msgid 1's answer left already
        other = Table.attach(ipcnames.table_name(instance))          # another process's view
        lost = recovery.take_over(other, 4)
        assert lost is not None and (lost.pid, lost.requests, lost.sends) == (os.getpid(), 2, 1)
        items = [i for m in lost.answered for i in frame.decode_replies(m)]
        assert [(i.sid, i.generation) for i in items] == [(1, 101), (2, 102)]
        dec, reader = frame.server_decoder(), FrameReader(1 << 20)
        errors = [dec.decode(body) for i in items for body in reader.feed(i.frame)]
        assert [(e.msgid, e.cpid, e.code) for e in errors] == [(3, 7, ErrorCode.WORKER_LOST), (4, 8, ErrorCode.WORKER_LOST)]
        [p] = [p for p in t.procs() if p.row == 4]
        assert (p.counters["requests"], p.counters["held"], p.counters["lost"]) == (14, 0, 3)   # 10 + all 4
        assert recovery.take_over(other, 4) is None                  # answered once
        other.close()
        hand.hold(message, 14)
        hand.answered(4)                                             # all answered: nothing to do
        assert recovery.take_over(t, 4) is None and t.in_hand(4).read() is None
        hand.hold(message, 18)
        hand.clear(22)              # all answered, and it died before publishing its count of 22
        assert recovery.take_over(t, 4) is None
        [p] = [p for p in t.procs() if p.row == 4]
        assert p.counters["requests"] == 22                          # the drain arithmetic adds up anyway
        with pytest.raises(ProtocolError, match="msgsize"):
            hand.hold(bytes(8193), 0)
    finally:
        t.close()
        t.unlink()


def test_attach_rejects_foreign_segments(instance):
    from multiprocessing import shared_memory
    name = ipcnames.table_name(instance)
    shm = shared_memory.SharedMemory(name=name, create=True, size=4096)
    try:
        with pytest.raises(ProtocolError):
            Table.attach(name)
    finally:
        shm.close()
        shm.unlink()


# --- client daemon: dialing ------------------------------------------------------------

def test_dial_resolves_a_name_off_the_loop_and_connects(monkeypatch):
    """A name is looked up in a thread: the loop keeps running (a timer fires) while the lookup
    hangs, then the dial connects; a numeric address needs no thread; a failed lookup fails the dial."""
    from duprep.clienthost import dial
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    release = threading.Event()
    real = socket.getaddrinfo

    def slow_dns(host, *args, **kw):
        if host == "gateway.example" and not kw.get("flags"):
            assert release.wait(10), "the loop did not run while the lookup hung"
            return real("127.0.0.1", *args, **kw)
        if host == "nowhere.example" and not kw.get("flags"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kw)
    monkeypatch.setattr(dial.socket, "getaddrinfo", slow_dns)
    loop = EventLoop()
    loop.running = True                          # run_once() below, as run() would
    results: list[object] = []

    def dial_to(host: str) -> dial.DirectDial:
        d = dial.DirectDial(loop, host, port, timeout=10, on_done=lambda r, w: results.append(r),
                            on_fail=lambda why: results.append(why))
        d.start()
        return d

    try:
        loop.call_later(0.05, release.set)       # runs only if the loop is not blocked in the lookup
        dial_to("gateway.example")
        while not results:
            loop.run_once()
        [sock] = results
        assert isinstance(sock, socket.socket) and sock.getpeername()[1] == port
        sock.close()
        results.clear()
        d = dial_to("127.0.0.1")
        assert d.resolve is None and d.sock is not None      # numeric: connecting already, no lookup thread
        while not results:
            loop.run_once()
        assert isinstance(results[0], socket.socket)
        results.pop().close()
        dial_to("nowhere.example")
        while not results:
            loop.run_once()
        assert "cannot resolve 'nowhere.example'" in str(results[0])
    finally:
        loop.close()
        listener.close()


def test_a_loop_stopped_before_it_runs_returns_at_once():
    """A gateway child whose acceptor is gone before its loop starts (READY could not be sent) stops
    the loop first: run() must return, not sleep for ever with the instance's queues open."""
    loop = EventLoop()
    fired: list[int] = []
    try:
        loop.call_later(30, lambda: fired.append(1))    # what run() would otherwise wait for
        loop.stop()
        t0 = time.monotonic()
        loop.run()
        assert time.monotonic() - t0 < 5 and not fired and not loop.running
    finally:
        loop.close()


def test_link_reports_the_sends_it_drops_before_writing_them():
    """SENDs still in the daemon's link buffer when the link fails come back from take_unsent();
    those the kernel took whole do not (a request has a route to fail it; a SEND has only this)."""
    from duprep.clienthost.config import DaemonConfig
    from duprep.clienthost.link import Link
    loop = EventLoop()
    link = Link(DaemonConfig(), loop, on_up=lambda w: None, on_frame=lambda f: None, on_down=lambda r: None)
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.setblocking(False)
        loop.register(a.fileno(), READ, lambda ev: None)
        link.rsock = link.wsock = a
        link.state = "up"
        frames = [bytes(3000) for _ in range(100)]              # 300 KB: far more than the buffers take
        for i, f in enumerate(frames):
            link.send(f, send_of=(7, i))
        link.flush()
        written = link.written
        assert 0 < written < sum(map(len, frames))
        link.fail("test")
        unsent = link.take_unsent()
        assert unsent == [(7, i) for i in range(written // 3000, 100)]   # a SEND cut in two counts as unsent
        assert link.take_unsent() == [] and link.queued == link.written == 0
    finally:
        link.stop()
        loop.close()
        b.close()


# --- queues --------------------------------------------------------------------------

def test_plan_fits_the_stock_kernel():
    lim = queues.KernelLimits(msg_max=10, msgsize_max=8192, queues_max=256, rlimit_msgqueue=819200)
    p = queues.plan(limits=lim)
    assert (p.depth, p.msgsize) == (10, 8192) and "msg_max" in p.clamped
    big = queues.KernelLimits(msg_max=1000, msgsize_max=1 << 20, queues_max=256, rlimit_msgqueue=819200)
    p = queues.plan(limits=big)
    assert 2 * p.bytes <= 819200 // 2 and p.msgsize >= 8192
    assert queues.plan(depth=3, msgsize=4096, limits=lim) == queues.QueuePlan(3, 4096)


def test_plan_keeps_depth_before_size():
    # Raised sysctls but the stock RLIMIT_MSGQUEUE: 12 x 16 KiB, not 3 x 64 KiB (a few big messages
    # let one full queue stall the stage behind it).
    lim = queues.KernelLimits(msg_max=64, msgsize_max=65536, queues_max=256, rlimit_msgqueue=819200)
    p = queues.plan(limits=lim)
    assert (p.depth, p.msgsize) == (12, 16384) and "RLIMIT_MSGQUEUE" in p.clamped
    assert 2 * p.bytes <= 819200 // 2 < 2 * queues.charge(13, 16384)
    # With room for it (LimitMSGQUEUE= in the unit) it takes everything it asks for.
    roomy = queues.KernelLimits(msg_max=64, msgsize_max=65536, queues_max=256, rlimit_msgqueue=64 << 20)
    assert queues.plan(limits=roomy) == queues.QueuePlan(64, 65536)
    # An explicit depth is kept and the size shrinks to fit it; an explicit size is kept and the depth shrinks.
    def geometry(p: queues.QueuePlan) -> tuple[int, int]:
        return p.depth, p.msgsize
    assert geometry(queues.plan(depth=20, limits=lim)) == (20, 8192)
    assert geometry(queues.plan(msgsize=65536, limits=lim)) == (3, 65536)
    # Fewer than MIN_DEPTH messages allowed at all: the size still shrinks until those fit.
    few = queues.KernelLimits(msg_max=4, msgsize_max=65536, queues_max=256, rlimit_msgqueue=819200)
    assert geometry(queues.plan(limits=few)) == (4, 32768)
    # Halving never goes below 8 KiB, also from a size that is not a power of two.
    odd = queues.KernelLimits(msg_max=64, msgsize_max=12000, queues_max=256, rlimit_msgqueue=300000)
    assert geometry(queues.plan(limits=odd)) == (9, 8192)


def test_client_daemon_uplink_keeps_depth_before_size():
    from duprep.clienthost.config import default_sizes

    def uplink(msg_max: int, msgsize_max: int, rlimit: int) -> tuple[int, int]:
        sizes = default_sizes(queues.KernelLimits(msg_max, msgsize_max, 256, rlimit))
        return sizes["uplink_depth"], sizes["uplink_size"]
    assert uplink(10, 8192, 819200) == (10, 8192)             # stock
    assert uplink(64, 65536, 819200) == (10, 8192)            # raised sysctls, default RLIMIT: not 2 x 64 KiB
    assert uplink(64, 65536, 64 << 20) == (10, 65536)         # and LimitMSGQUEUE=64M
    assert uplink(3, 8192, 819200) == (3, 8192)


def test_create_over_msg_max_names_the_limit(instance):
    name = ipcnames.request_queue(instance)
    with pytest.raises(LimitError, match="fs.mqueue.msg_max"):
        queues.create(name, queues.QueuePlan(queues.kernel_limits().msg_max + 1, 8192))


def test_create_over_rlimit_names_the_limit(instance):
    made = []
    try:
        with pytest.raises(LimitError, match="RLIMIT_MSGQUEUE"):
            for i in range(200):
                name = f"/duprep.{instance}.fill{i}"
                made.append((name, queues.create(name, queues.QueuePlan(10, 8192))))
    finally:
        for name, mq in made:      # the kernel charges a queue's bytes until it is unlinked *and* closed
            mq.close()
            queues.unlink(name)


def test_queue_nonblocking_and_timeouts(instance):
    name = ipcnames.request_queue(instance)
    q = queues.Queue(name, queues.create(name, queues.QueuePlan(2, 1024)))
    try:
        with pytest.raises(WouldBlock):
            q.get_nowait()
        q.put_nowait(b"a")
        q.put(b"b", timeout=0.1)
        with pytest.raises(WouldBlock):
            q.put(b"c", timeout=0.05)
        assert q.depth_now() == 2 and q.get() == b"a" and q.get_nowait() == b"b"
        with pytest.raises(WouldBlock):
            q.get(timeout=0.05)
    finally:
        q.close()
        queues.unlink(name)


# --- fd passing ----------------------------------------------------------------------

def test_fd_passing_round_trip():
    a, b = fdpass.pair()
    x, y = socket.socketpair()
    try:
        fdpass.send(a, fdpass.Op.CONN, 5, 6, x.fileno())
        rec = fdpass.recv(b)
        assert (rec.op, rec.sid, rec.generation) == (fdpass.Op.CONN, 5, 6)
        got = socket.socket(fileno=rec.fd)
        got.sendall(b"ping")
        assert y.recv(4) == b"ping"
        got.close()
        fdpass.send(a, fdpass.Op.RELEASED, 1, 2)
        assert fdpass.recv(b) == fdpass.Record(fdpass.Op.RELEASED, 1, 2, -1)
        b.setblocking(False)
        with pytest.raises(WouldBlock):
            fdpass.recv(b)
    finally:
        for s in (a, b, x, y):
            s.close()


def test_fd_passing_rejects_a_conn_without_fd_and_closes_stray_fds():
    a, b = fdpass.pair()
    x, y = socket.socketpair()
    try:
        a.send(fdpass.RECORD.pack(fdpass.Op.CONN, 1, 1))
        with pytest.raises(ProtocolError):
            fdpass.recv(b)
        before = len(os.listdir("/proc/self/fd"))
        socket.send_fds(a, [fdpass.RECORD.pack(fdpass.Op.READY, 0, 0)], [x.fileno()])
        with pytest.raises(ProtocolError):
            fdpass.recv(b)
        assert len(os.listdir("/proc/self/fd")) == before     # the stray fd was closed
    finally:
        for s in (a, b, x, y):
            s.close()


# --- config, names, locks, loop --------------------------------------------------------

def test_client_sockets_get_keepalive_and_user_timeout():
    from duprep.gateway import net
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()):
        conn, _ = server.accept()
        with conn:
            net.tune_client(conn, sndbuf=65536, keepalive=60, write_timeout=30)
            opt = lambda level, name: conn.getsockopt(level, name)   # noqa: E731
            assert opt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1 and opt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert (opt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), opt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    opt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == (60, 10, 6)
            assert opt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 120000    # not shorter than the probing
            net.tune_client(conn, sndbuf=0, keepalive=2, write_timeout=20)
            assert opt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 40000     # nor than --write-timeout
            assert not conn.getblocking()


def test_config_validation_and_round_trip():
    cfg = GatewayConfig(instance="x", port=0, workers=3)
    assert GatewayConfig.decode(cfg.encode()) == cfg
    for bad in ({"instance": "../etc"}, {"port": 70000}, {"workers": -1}, {"max_clients": 0},
                {"handshake_timeout": 0}, {"hang_timeout": -1}, {"hang_timeout": 59.9}, {"heartbeat": 0},
                {"heartbeat": 5, "hang_timeout": 9}, {"keepalive": -1}, {"keepalive": 0.5},
                {"keepalive": 32768}, {"heartbeat": 1e9}, {"heartbeat": float("nan")},
                {"drain_timeout": 86401}, {"hang_timeout": float("inf")}):
        with pytest.raises(ConfigError):
            GatewayConfig(**bad)
    assert GatewayConfig(hang_timeout=0).hang_timeout == 0 == GatewayConfig(heartbeat=5, hang_timeout=0).hang_timeout
    with pytest.raises(ConfigError, match="at least twice --heartbeat"):
        GatewayConfig(heartbeat=5, hang_timeout=9)
    assert resolve_port("2000") == 2000
    with pytest.raises(ConfigError):
        resolve_port("no-such-service-anywhere")


def test_max_outbuf_must_hold_the_largest_frame_twice():
    """relay_room = max_outbuf // 2 must take the largest relayed frame, and max_outbuf one reply."""
    for bad in (-1, 0, 65535):
        with pytest.raises(ConfigError, match=f"--max-outbuf must be at least 65536 bytes, got {bad}"):
            GatewayConfig(max_outbuf=bad)
    with pytest.raises(ConfigError, match=r"at least 131072 bytes \(twice the queue message size, 65536 bytes\)"):
        GatewayConfig(queue_size=65536, max_outbuf=131071)
    cfg = GatewayConfig(max_outbuf=65536)
    cfg.check_outbuf(32768)
    with pytest.raises(ConfigError, match="at least 65538 bytes"):
        cfg.check_outbuf(32769)          # what the acceptor finds once the kernel sized its queues
    assert GatewayConfig(queue_size=65536, max_outbuf=131072).max_outbuf == 131072


def test_ipc_names_come_from_one_place():
    assert ipcnames.all_names("a.b") == {
        "table": "duprep.a.b.table", "requests": "/duprep.a.b.req", "replies": "/duprep.a.b.rep",
        "lock": os.path.join(ipcnames.LOCK_DIR, "duprep.a.b.lock")}
    for bad in ("", ".x", "a/b", "a b", "x" * 49):
        with pytest.raises(ConfigError):
            ipcnames.check_instance(bad)


def test_gateway_lock_refuses_a_second_holder(instance):
    first = InstanceLock(instance)
    first.acquire_gateway()
    try:
        code = ("import sys; sys.path.insert(0, %r)\nfrom duprep.lock import InstanceLock\n"
                "from duprep.errors import InstanceBusyError\n"
                "try:\n    InstanceLock(%r).acquire_gateway(wait_attached=0)\nexcept InstanceBusyError:\n"
                "    sys.exit(7)\n") % (ROOT, instance)
        assert subprocess.run([sys.executable, "-c", code]).returncode == 7
    finally:
        first.unlink()
        first.close()


def test_each_instance_lock_holds_its_own_rows_also_within_one_process(instance):
    """OFD locks: two handles in one process conflict like two processes, and closing one (a Replier's
    close() in a worker process) keeps the other's locks."""
    a, b, c = (InstanceLock(instance).open() for _ in range(3))
    try:
        a.attach(timeout=0)
        b.attach(timeout=0)
        assert (a.claim_row(3, 10), b.claim_row(3, 10)) == (3, 4)
        assert not b.take_row(3) and not a.take_row(4)
        assert rows_held(instance, [3, 4, 5]) == {3: True, 4: True, 5: False}
        c.attach(timeout=0)
        c.close()                                   # another descriptor of the file, closed
        assert rows_held(instance, [3, 4]) == {3: True, 4: True}
        b.close()
        assert rows_held(instance, [3, 4]) == {3: True, 4: False}
        d = InstanceLock(instance).open()
        assert not d.take_row(3)
        d.close()
        with pytest.raises(InstanceBusyError):
            d.acquire_gateway(wait_attached=0)      # a's attach lock is still there (d closes itself)
    finally:
        for lock in (a, b, c):
            lock.close()
        os.unlink(ipcnames.lock_path(instance))


def test_a_forked_child_does_not_keep_its_parents_locks(instance):
    """fork() shares the open file description, and with it OFD locks: the child lets go of its copy,
    so the parent's row is free once the parent closes it, while the child still lives."""
    lock = InstanceLock(instance).open()
    try:
        assert lock.claim_row(3, 10) == 3
        r, w = os.pipe()
        up_r, up_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                # the child: say it runs, wait until told, leave
            try:
                os.close(w)
                os.write(up_w, b"x")                # (the fork handlers ran before this)
                os.read(r, 1)
            finally:
                os._exit(0 if lock.fd == -1 else 1)
        os.close(r)
        os.close(up_w)
        try:
            assert os.read(up_r, 1) == b"x"
            os.close(up_r)
            lock.close()
            assert rows_held(instance, [3]) == {3: False}, "the forked child kept the parent's row lock"
        finally:
            os.close(w)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        lock.close()
        os.unlink(ipcnames.lock_path(instance))


def test_waiting_for_the_attach_lock_works_in_any_thread(instance):
    """A gateway that boots holds the attach lock exclusively: attach() waits for it without SIGALRM,
    so also outside the main thread; it gives up at its timeout."""
    boot = InstanceLock(instance)
    boot.acquire_gateway(wait_attached=0)
    results: dict[str, object] = {}
    waiting = threading.Event()

    def attach(key: str, timeout: float) -> None:
        lock = InstanceLock(instance)
        waiting.set()
        start = time.monotonic()
        try:
            lock.attach(timeout=timeout)
            results[key] = time.monotonic() - start
        except BaseException as e:
            results[key] = e
        finally:
            lock.close()
    try:
        t = threading.Thread(target=attach, args=("expired", 0.2))
        t.start()
        t.join(10)
        assert isinstance(results["expired"], InstanceBusyError), results
        waiting.clear()
        t = threading.Thread(target=attach, args=("granted", 10.0))
        t.start()
        waiting.wait(10)
        boot.share_attach()                         # the gateway is set up
        t.join(10)
        assert isinstance(results["granted"], float) and results["granted"] < 5, results
    finally:
        boot.unlink()
        boot.close()


def test_event_loop_timers_and_deferred_close():
    loop = EventLoop()
    a, b = socket.socketpair()
    seen = []
    loop.register(a.fileno(), READ, lambda ev: (seen.append(a.recv(10)), loop.close_later(a)))
    loop.call_later(0.01, lambda: b.send(b"x"))
    loop.call_later(0.05, loop.stop)
    cancelled = loop.call_later(0.02, lambda: seen.append("never"))
    cancelled.cancel()
    loop.run()
    assert seen == [b"x"] and a.fileno() == -1 and not loop.registered(3)
    b.close()
    loop.close()


def test_control_channel_queues_what_would_block_and_keeps_order():
    from duprep.gateway.control import Control
    a, b = fdpass.pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop_a, loop_b = EventLoop(), EventLoop()
    got: list[int] = []
    ca = Control(a, loop_a, lambda rec: None, lambda: None)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)        # small again: force the outbox
    cb = Control(b, loop_b, lambda rec: got.append(rec.sid), lambda: None)
    for i in range(5000):
        ca.send(fdpass.Op.RELEASED, i, 1)
    assert ca.outbox, "the test needs the socket buffer to fill up"
    for _ in range(10000):
        if len(got) == 5000:
            break
        loop_a._ep.poll(0)
        ca._flush()
        cb.poll()
    assert got == list(range(5000)) and not ca.outbox
    for loop in (loop_a, loop_b):
        loop.close()
    a.close()
    b.close()


def test_a_hand_over_refused_for_descriptors_in_flight_waits_and_is_retried_without_spinning(monkeypatch):
    """ETOOMANYREFS (an unprivileged user's descriptors in flight over RLIMIT_NOFILE) used to crash the
    acceptor.  Now the record waits in the outbox, retried on a timer: the socket is writable all
    along, so EPOLLOUT would spin; the order of records is kept."""
    from duprep.gateway import control
    a, b = fdpass.pair()
    loop_a, loop_b = EventLoop(), EventLoop()
    got: list[tuple[int, int]] = []
    ca = control.Control(a, loop_a, lambda rec: None, lambda: None)
    cb = control.Control(b, loop_b, lambda rec: got.append((rec.op, rec.sid)), lambda: None)
    real, tries = fdpass.send, []

    def send(sock: socket.socket, op: int, sid: int = 0, gen: int = 0, fd: int | None = None) -> None:
        tries.append(sid)
        if fd is not None and len(tries) <= 3:
            raise fdpass.InFlightLimit("descriptors handed over and not yet taken exceed RLIMIT_NOFILE")
        real(sock, op, sid, gen, fd)
    monkeypatch.setattr(control.fdpass, "send", send)
    loop_a.running = True                         # run_once() below, as run() would
    x, y = socket.socketpair()
    try:
        ca.send(fdpass.Op.CONN, 7, 1, x.fileno())
        ca.send(fdpass.Op.RELEASED, 8, 1)         # behind it, in order
        assert [r[:2] for r in ca.outbox] == [(fdpass.Op.CONN, 7), (fdpass.Op.RELEASED, 8)]
        t0 = time.monotonic()
        while len(got) < 2 and time.monotonic() - t0 < 10:
            loop_a.run_once()
            cb.poll()
        assert got == [(fdpass.Op.CONN, 7), (fdpass.Op.RELEASED, 8)] and not ca.outbox
        assert tries == [7, 7, 7, 7, 8]           # one try per retry timer, not one per loop turn
        assert time.monotonic() - t0 >= 3 * control.RETRY * 0.9
    finally:
        for loop in (loop_a, loop_b):
            loop.close()
        for s in (a, b, x, y):
            s.close()


def test_seqlock_reader_waits_for_a_slow_writer_and_gives_up_on_a_dead_one(table, monkeypatch):
    import threading
    import time as _time
    import duprep.table as t
    part = table.a_part(2)
    part.write(5, SlotState.OPEN, 1, 1.0, b"x")
    struct.pack_into("<I", table.buf, part.off, 7)            # a writer in the middle of a write
    done = threading.Event()

    def finish() -> None:
        _time.sleep(0.05)
        struct.pack_into("<I", table.buf, part.off, 8)        # ... that finishes after a while
        done.set()
    threading.Thread(target=finish).start()
    assert part.read()[0] == 5 and done.is_set()
    struct.pack_into("<I", table.buf, part.off, 9)            # one that never finishes
    monkeypatch.setattr(t, "READ_PATIENCE", 0.05)
    with pytest.raises(ProtocolError, match="died mid-write"):
        part.read()
    assert part.read_own()[0] == 5                            # its successor, the only writer now, reads it
    part.write(6, SlotState.OPEN, 1, 1.0, b"x")               # ... and its next write is whole again
    assert part.read()[0] == 6
    row = table.proc_part(3)
    ProcRow(table, 3, Role.WORKER).beat()
    struct.pack_into("<I", table.buf, row.off, struct.unpack_from("<I", table.buf, row.off)[0] + 1)
    assert [p.row for p in table.procs()] == [3]               # a dead writer's row does not break procs()


def test_sched_switches_only_between_other_and_batch():
    """A policy somebody chose on purpose (here SCHED_IDLE; a unit's real-time one alike) is kept."""
    code = (
        "import os; from duprep import sched\n"
        "p = lambda: os.sched_getscheduler(0)\n"
        "sched.apply('batch'); a = p()\n"
        "sched.apply('other'); b = p()\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); sched.apply('batch'); c = p()\n"
        "print(a == os.SCHED_BATCH, b == os.SCHED_OTHER, c == os.SCHED_IDLE)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr


def test_inbox_bounds_pushes_but_keeps_every_answer():
    from duprep.client import Message
    from duprep.inbox import OVERHEAD, Inbox
    box = Inbox(max_bytes=3 * (100 + OVERHEAD))
    push = Message("push", 0, b"x" * 100)
    assert [box.offer(push) for _ in range(5)] == [True, True, True, False, False] and box.dropped == 2
    for _ in range(10):
        box.put(Message("late", 7, b"y" * 100))       # answers: kept although the box is full
    box.put(marker := object())
    assert box.get(0) is push and box.offer(push)      # and they take none of the pushes' room
    assert not box.offer(push) and box.dropped == 3
    assert [box.get(0).kind for _ in range(12)] == ["push"] * 2 + ["late"] * 10  # type: ignore[attr-defined]
    assert box.get(0) is marker and box.get(0) is push and box.dropped == 3
    with pytest.raises(queue.Empty):
        box.get(0)
    assert box._bytes == 0


# --- the client daemon's route map: unanswered requests are bounded ------------------------------

def test_routes_expire_late_grace_after_their_deadline_but_keep_deferred_ones() -> None:
    r = Routes(grace=10.0)
    answered, _ = r.add(1, 1, due=100.0)
    silent, _ = r.add(1, 2, due=100.0)
    deferred, _ = r.add(1, 3, due=100.0)
    forever, _ = r.add(1, 4)                           # timeout_ms 0: no deadline
    assert r.resolve(answered, final=True) is not None
    assert r.resolve(deferred, final=False) is not None
    assert r.overdue(99.0) == 0 and r.overdue(100.0) == 1
    assert r.last_due() is None                        # someone waits for ever: the stop waits drain_timeout
    assert r.expire(109.0) == (0, True)
    assert r.expire(110.0) == (1, False)               # only the silent one; nothing left with a deadline
    assert r.resolve(silent, final=True) is None       # its answer, if it ever comes, is unmatched
    assert r.waiting() == 2 and r.waiting(include_deferred=False) == 1
    assert r.resolve(forever, final=True) is not None and r.last_due() == 0.0


def test_routes_keep_at_most_max_routes_and_return_the_forgotten_one() -> None:
    r = Routes(max_routes=2)
    first, evicted = r.add(7, 11)
    assert evicted is None
    r.add(7, 12)
    _, evicted = r.add(8, 13)
    assert evicted is not None and (evicted.ep, evicted.msgid) == (7, 11)
    assert r.resolve(first, final=True) is None and r.waiting() == 2 and r.in_flight(7) == (1, 0)


def test_routes_keep_a_worker_lost_request_for_the_reply_that_may_follow() -> None:
    r = Routes()
    wire, _ = r.add(3, 5, due=1.0)
    route = r.resolve(wire, final=True)
    assert route is not None
    r.worker_lost(wire, route)
    again = r.resolve(wire, final=True)
    assert again is not None and (again.ep, again.msgid) == (3, 5)
    assert r.resolve(wire, final=True) is None          # a third answer is unmatched
