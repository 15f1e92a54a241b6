"""The gateway end to end: real processes, sockets on 127.0.0.1, queues, shared memory."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import msgspec
import pytest

import duprep
from duprep import bus, frame
from duprep.frame import Call, ErrorCode, Hello, encode_wire
from duprep.gateway.child import EXIT_BUSY, EXIT_LIMIT
from duprep.status import render, snapshot
from duprep.wire import FrameReader

from .conftest import ROOT, alive, comm, descendants, duprep_cli, ipc_leftovers, wait_until
from .conftest import read_frames as _frames, worker_rows as _worker_rows

pytestmark = pytest.mark.slow


def gateway_processes(gw) -> dict[str, list[int]]:
    roles: dict[str, list[int]] = {}
    for pid in [gw.pid, *descendants(gw.pid)]:
        roles.setdefault(comm(pid), []).append(pid)
    return roles


def read_error(sock: socket.socket, timeout: float = 10.0) -> frame.Error:
    """Read frames until the gateway closes; return the ERROR frame it sent."""
    sock.settimeout(timeout)
    reader, dec, errors = FrameReader(1 << 20), frame.server_decoder(), []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        errors += [f for f in map(dec.decode, reader.feed(data)) if isinstance(f, frame.Error)]
    assert errors, "connection closed without an ERROR frame"
    return errors[-1]


def test_300_clients_50_requests_each(gateway, instance):
    gw = gateway("--max-clients", "400")
    clients = [duprep.Client("127.0.0.1", gw.port, name=f"c{i}", timeout=60) for i in range(300)]
    try:
        out = duprep_cli("status", "--instance", instance, "--json")
        snap = json.loads(out.stdout)
        assert {c["name"] for c in snap["connections"]} == {f"c{i}" for i in range(300)}
        assert snap["state"] == "ready"
        roles = gateway_processes(gw)
        assert len(roles["duprep-receiver"]) == 1 and len(roles["duprep-sender"]) == 1
        assert len(roles["duprep-worker"]) == 2

        failures: list[str] = []

        def run(i: int, client: duprep.Client) -> None:
            rng = random.Random(i)
            for n in range(50):
                payload = f"{i}:{n}:".encode() + rng.randbytes(rng.randrange(0, 3000))
                try:
                    reply = client.request(payload)
                except Exception as e:        # reported below with its client
                    failures.append(f"client {i} request {n}: {e!r}")
                    return
                if reply != payload:
                    failures.append(f"client {i} request {n}: wrong reply {reply[:20]!r}")
                    return

        threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures[:5]
        roles = gateway_processes(gw)
        gateway_only = [p for r, ps in roles.items() if r != "duprep-worker" for p in ps]
        assert len(gateway_only) == 3, roles
        # HELLO + 50 REQUESTs in, WELCOME + 50 REPLYs out, per client (counters reach the table within 1 s)
        wait_until(lambda: (lambda t: t["frames_in"] == t["frames_out"] == 300 * 51)(snapshot(instance)["totals"]),
                   what="per-connection counters to add up")
        totals = snapshot(instance)["totals"]
        assert totals["dropped"] == 0 and totals["dropped_stale"] == 0
    finally:
        for c in clients:
            c.close()


def test_timeout_then_late_reply_surfaces_through_receive(gateway):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port) as c:
        with pytest.raises(duprep.Timeout) as info:
            c.request(b"sleep:0.5", timeout=0.1)
        assert isinstance(info.value, TimeoutError)
        assert c.request(b"fresh", timeout=10) == b"fresh"      # its own reply, not the late one
        late = c.receive(timeout=10)
        assert (late.kind, late.msgid, late.data) == ("late", info.value.msgid, b"sleep:0.5")


def test_client_options_none_timeout_keepalive_and_refused_frames(gateway):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port, timeout=None) as c:         # None: no deadline anywhere
        assert c.request(b"no deadline") == b"no deadline"
        c.send(b"one way")
        opt = c._sock.getsockopt
        assert opt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1           # a vanished gateway is noticed
        assert (opt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), opt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                opt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == (10, 5, 3)
        for _ in range(3):
            with pytest.raises(duprep.ProtocolError):
                c.request(b"x" * c.max_frame)
        assert not c._waiting                 # a request whose frame was refused leaves no waiter behind
        assert c.request(b"still fine", timeout=10) == b"still fine"


def test_request_and_send_time_out_while_the_gateway_does_not_read(gateway):
    """A timeout counts writing too: a call whose frame cannot be written (another thread's write in
    progress, or the kernel's buffers full) gets Timeout on time, and the connection stays consistent."""
    gw = gateway(workers=1)
    with duprep.Client("127.0.0.1", gw.port, timeout=30) as c:
        big = b"y" * (c.max_frame - 64)
        # 1. Another thread's frame is being written: a request cannot begin its own.
        c.send(b"sleep:4")                    # the only worker sleeps: queues, backlog, then TCP fill up
        stop = threading.Event()
        started: list[float] = []
        errors: list[BaseException] = []

        def flood() -> None:
            try:
                while not stop.is_set():
                    started.append(time.monotonic())
                    c.send(big, timeout=60)
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                errors.append(e)
        t = threading.Thread(target=flood)
        t.start()
        try:
            wait_until(lambda: errors or time.monotonic() - started[-1] > 0.3, timeout=30,
                       what="a send() waiting for the gateway to read")
            t0 = time.monotonic()
            with pytest.raises(duprep.Timeout):
                c.request(b"ping", timeout=1)
            assert time.monotonic() - t0 < 2.5
            assert not c._waiting             # the request was never written: nothing waits for it
        finally:
            stop.set()
            t.join(60)
        assert not errors and not t.is_alive()
        assert c.request(b"after", timeout=30) == b"after"      # the worker woke: everything flows again

        # 2. The kernel's buffers are full: the write itself gives up at the deadline.
        c.send(b"sleep:4")
        give_up = time.monotonic() + 3
        with pytest.raises(duprep.Timeout):
            while time.monotonic() < give_up:
                t0 = time.monotonic()
                try:
                    c.send(big, timeout=0.3)
                finally:
                    assert time.monotonic() - t0 < 1.3
        if c._broken is None:                 # the frame had not begun: the connection goes on
            assert c.request(b"after", timeout=30) == b"after"
        else:                                 # it was cut short: the gateway could not find the next one
            assert "cut short" in str(c._broken)
            with pytest.raises(duprep.BrokenResourceError):
                c.request(b"after", timeout=30)


def test_reply_for_a_gone_client_never_reaches_the_slot_reuser(gateway, instance):
    gw = gateway("--max-clients", "1")
    old = duprep.Client("127.0.0.1", gw.port, name="old")
    old_sid, old_gen = old.sid, old.generation
    old._write(Call(99, 1, 0, b"sleep:0.6|for-old"), None)     # in flight when the client vanishes
    wait_until(lambda: snapshot(instance)["processes"] and any(
        p["role"] == "worker" and p["counters"].get("queue_messages") for p in snapshot(instance)["processes"]),
        what="the worker to take the request")
    old.close()
    wait_until(lambda: not snapshot(instance)["connections"], what="the slot to be freed")
    with duprep.Client("127.0.0.1", gw.port, name="new") as new:
        assert new.sid == old_sid and new.generation != old_gen
        wait_until(lambda: snapshot(instance)["totals"]["dropped_stale"] == 1, what="the stale reply to be dropped")
        assert new.request(b"mine") == b"mine"
        with pytest.raises(duprep.Timeout):
            new.receive(timeout=0.3)        # nothing of the old client's arrived


def test_relay_between_named_clients_and_to_unknown(gateway):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port, name="alice") as alice, \
            duprep.Client("127.0.0.1", gw.port, name="bob") as bob:
        alice.relay("bob", b"hello bob")
        msg = bob.receive(timeout=10)
        assert (msg.kind, msg.source, msg.data) == ("relay", "alice", b"hello bob")
        with pytest.raises(duprep.UnknownTarget):
            alice.relay("nobody", b"?")
        assert alice.request(b"still fine") == b"still fine"


def test_deferred_reply_from_another_process(gateway, instance):
    gw = gateway()
    with tempfile.TemporaryDirectory() as tmp, duprep.Client("127.0.0.1", gw.port) as c:
        with pytest.raises(duprep.Deferred) as info:
            c.request(f"defer:{tmp}".encode(), timeout=10)
        [name] = os.listdir(tmp)
        with open(os.path.join(tmp, name), "rb") as f:
            request = msgspec.msgpack.decode(f.read(), type=bus.Request)
        assert request.msgid == info.value.msgid
        with bus.Replier(instance) as replier:      # this test process, not the worker
            replier.reply(request, b"answer after all")
        msg = c.receive(timeout=10)
        assert (msg.kind, msg.msgid, msg.data) == ("deferred", info.value.msgid, b"answer after all")


def test_push_reaches_only_the_addressed_client(gateway, instance):
    gw = gateway()
    names = ["alice", "bob", "carol"]
    clients = {n: duprep.Client("127.0.0.1", gw.port, name=n) for n in names}
    try:
        with bus.Replier(instance) as r:
            sid, gen = r.push("bob", b"for bob only")
            assert (sid, gen) == (clients["bob"].sid, clients["bob"].generation)
            with pytest.raises(duprep.UnknownTarget):
                r.push("dave", b"x")
        msg = clients["bob"].receive(timeout=10)
        assert (msg.kind, msg.data) == ("push", b"for bob only")
        for n in ("alice", "carol"):
            with pytest.raises(duprep.Timeout):
                clients[n].receive(timeout=0.2)
    finally:
        for c in clients.values():
            c.close()


@pytest.mark.parametrize("ask, says", [(b"fail", "on purpose"),       # the handler raises
                                       (b"str", "returned str")])     # it returns what is no reply
def test_handler_error_is_reported_and_worker_survives(gateway, ask, says):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port) as c:
        with pytest.raises(duprep.RemoteError) as info:
            c.request(ask)
        assert info.value.code == ErrorCode.APP_ERROR and says in str(info.value)
        assert c.request(b"ok") == b"ok"


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _frames_until_end(sock: socket.socket, reader: FrameReader) -> list[object]:
    """Every frame until the gateway ends the connection (EOF or reset); fails the test if it does not."""
    dec, got = frame.server_decoder(), []
    try:
        while data := sock.recv(65536):
            got += map(dec.decode, reader.feed(data))
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was not ended; frames received: {got}")
    return got


def _kill_receiver(gw, instance: str) -> None:
    """kill -9 the receiver; return once its successor is up (in the table, alive)."""
    [victim] = [p for p in descendants(gw.pid) if comm(p) == "duprep-receiver"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: [p for p in snapshot(instance)["processes"]
                        if p["role"] == "receiver" and p["pid"] != victim and alive(p["pid"])],
               what="a new receiver")


def _request_after_restart(client: duprep.Client, data: bytes) -> None:
    """A request racing a restart may be lost; a later one must be answered (within 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            assert client.request(data, timeout=2) == data
            return
        except duprep.Timeout:
            assert time.monotonic() < deadline, "no reply after the restart"


def test_bad_input_ends_only_the_offending_connection(gateway, instance):
    gw = gateway("--handshake-timeout", "1")
    good = [duprep.Client("127.0.0.1", gw.port, name=f"good{i}") for i in range(50)]
    stop = threading.Event()
    failures: list[str] = []
    counts = [0] * len(good)

    def behave(i: int) -> None:
        while not stop.is_set():
            try:
                data = os.urandom(64)
                if good[i].request(data, timeout=20) != data:
                    failures.append(f"good{i}: wrong reply")
                counts[i] += 1
            except Exception as e:
                failures.append(f"good{i}: {e!r}")
                return

    threads = [threading.Thread(target=behave, args=(i,)) for i in range(len(good))]
    for t in threads:
        t.start()
    try:
        hello = encode_wire(Hello(1, ""))
        cases = {
            "garbage": (random.Random(1).randbytes(300), ErrorCode.FRAME_TOO_LARGE),
            "bad msgpack": (struct.pack(">I", 3) + b"\xc1\xc1\xc1", ErrorCode.BAD_FRAME),
            "oversized": (hello + struct.pack(">I", 10_000_000), ErrorCode.FRAME_TOO_LARGE),
            "request before hello": (encode_wire(Call(1, 1, 0, b"x")), ErrorCode.BAD_HELLO),
            "second hello": (hello + hello, ErrorCode.BAD_HELLO),
            "bad utf-8 name": (struct.pack(">I", 5) + b"\x93\x01\x01\xa1\xff", ErrorCode.BAD_FRAME),
            # looks like a REQUEST to the receiver, so a worker finds the bad field
            "bad request field": (hello + struct.pack(">I", 7) + b"\x95\x02\xff\x01\x01\xc4\x00", ErrorCode.BAD_FRAME),
            # ... and when its body is cut short, the next frame's bytes must not complete it
            "truncated request body": (hello + struct.pack(">I", 3) + b"\x95\x02\x01" + encode_wire(Call(2, 1, 0, b"y")),
                                       ErrorCode.BAD_FRAME),
            "empty frame": (hello + struct.pack(">I", 0), ErrorCode.BAD_FRAME),
            "one-byte frame": (hello + struct.pack(">I", 1) + b"\x95" + encode_wire(Call(2, 1, 0, b"y")),
                               ErrorCode.BAD_FRAME),
            "wrong version": (encode_wire(Hello(9, "")), ErrorCode.BAD_VERSION),
            "silence": (b"", ErrorCode.HANDSHAKE_TIMEOUT),
            "name taken": (encode_wire(Hello(1, "good0")), ErrorCode.NAME_TAKEN),
        }
        for what, (data, code) in cases.items():
            s = _raw(gw.port)
            try:
                s.sendall(data)
                err = read_error(s)
                assert err.code == code, f"{what}: got {ErrorCode.names.get(err.code)} {err.message}"
            finally:
                s.close()
        # truncated: half a frame, then the client vanishes
        s = _raw(gw.port)
        s.sendall(hello + encode_wire(Call(1, 1, 0, b"x" * 100))[:50])
        s.close()
        wait_until(lambda: len(snapshot(instance)["connections"]) == len(good), what="bad connections to go")
        assert all(counts), "a well-behaved client made no progress"

        def worker_counts(name: str) -> int:
            return sum(p["counters"][name] for p in snapshot(instance)["processes"] if p["role"] == "worker")
        # the two malformed REQUESTs a worker found count as bad frames, not as handler errors
        wait_until(lambda: worker_counts("bad_frames") == 2, what="the workers' bad_frames to reach 2")
        assert worker_counts("handler_errors") == 0
        snap = snapshot(instance)
        [receiver] = [p for p in snap["processes"] if p["role"] == "receiver"]
        assert snap["totals"]["protocol_errors"] == receiver["counters"]["protocol_errors"] + 2
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for c in good:
            c.close()
    assert not failures, failures[:5]


def test_client_that_never_reads_does_not_stall_others(gateway, instance):
    gw = gateway("--max-outbuf", "65536")
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", gw.port))
    hog.sendall(encode_wire(Hello(1, "hog")))
    payload = b"z" * 4000
    burst = b"".join(encode_wire(Call(i, 1, 0, payload)) for i in range(1, 1001))   # 4 MB of replies
    sender = threading.Thread(target=lambda: _send_quietly(hog, burst))
    sender.start()
    try:
        with duprep.Client("127.0.0.1", gw.port, name="polite") as polite:
            for i in range(50):
                assert polite.request(b"%d" % i, timeout=10) == b"%d" % i
            wait_until(lambda: snapshot(instance)["totals"]["slow_disconnects"] >= 1, timeout=20,
                       what="the hog to be disconnected")
            assert polite.request(b"after", timeout=10) == b"after"
            assert [c["name"] for c in snapshot(instance)["connections"]] == ["polite"]
    finally:
        hog.close()
        sender.join(30)


def test_a_relay_flood_cannot_get_its_target_cut_off(gateway, instance):
    """Relayed PUSHes for a target that does not keep up are dropped and counted (protocol.md 1.6);
    the target keeps its connection, and every relayed PUSH is either delivered or counted."""
    gw = gateway("--max-outbuf", "65536")
    victim = socket.socket()
    victim.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    victim.settimeout(20)
    victim.connect(("127.0.0.1", gw.port))
    attacker = _raw(gw.port)
    reader, dec = FrameReader(1 << 20), frame.server_decoder()
    n = 2000
    try:
        victim.sendall(encode_wire(Hello(1, "victim")))
        assert isinstance(_frames(victim, reader, 1)[0], frame.Welcome)
        attacker.sendall(encode_wire(Hello(1, "")))
        flood = b"".join(encode_wire(frame.Relay(i, 1, "victim", b"r" * 1000)) for i in range(1, n + 1))
        attacker.sendall(flood)                   # 2 MB for a victim that reads nothing meanwhile
        acks = _frames(attacker, FrameReader(1 << 20), n + 1)
        assert sum(isinstance(f, frame.Reply) and f.data == b"" for f in acks) == n

        def sender_counter(name: str) -> int:
            [row] = [p for p in snapshot(instance)["processes"] if p["role"] == "sender"]
            return int(row["counters"][name])
        wait_until(lambda: sender_counter("relays_dropped") > 0, what="relayed pushes to be dropped")
        victim.sendall(encode_wire(Call(99, 1, 0, b"still here")))
        victim.settimeout(20)
        pushes = 0
        while True:                               # the victim reads everything, then its own answer
            data = victim.recv(65536)
            assert data, "the victim was disconnected"
            got = [dec.decode(b) for b in reader.feed(data)]
            pushes += sum(isinstance(f, frame.Push) for f in got)
            if frame.Reply(99, 1, b"still here") in got:
                break
        assert 0 < pushes < n
        wait_until(lambda: pushes + sender_counter("relays_dropped") == n,
                   what="every relayed push delivered or counted")
        assert sender_counter("slow_disconnects") == 0
    finally:
        victim.close()
        attacker.close()


def test_a_client_that_does_not_call_receive_holds_a_bounded_inbox(gateway, instance):
    """Pushes beyond max_inbox bytes are dropped and counted (pushes_dropped), never held without
    limit; every relayed push is received, or counted by the client or by the gateway."""
    gw = gateway()
    n = 2000
    with duprep.Client("127.0.0.1", gw.port, name="sink", max_inbox=64 * 1024) as sink:
        attacker = _raw(gw.port)
        try:
            attacker.sendall(encode_wire(Hello(1, "")) + b"".join(
                encode_wire(frame.Relay(i, 1, "sink", b"p" * 1000)) for i in range(1, n + 1)))
            acks = _frames(attacker, FrameReader(1 << 20), n + 1)
            assert sum(isinstance(f, frame.Reply) for f in acks) == n
        finally:
            attacker.close()
        def relays_dropped() -> int:
            [row] = [p for p in snapshot(instance)["processes"] if p["role"] == "sender"]
            return int(row["counters"]["relays_dropped"])
        held = sink._inbox._q.qsize                 # (what waits for receive(), without taking it)
        wait_until(lambda: held() + sink.pushes_dropped + relays_dropped() == n,
                   what="every relayed push held or counted")
        waiting = held()
        assert sink.pushes_dropped > 0 and 0 < waiting <= 64 * 1024 // 1200
        received = [sink.receive(timeout=0) for _ in range(waiting)]
        assert {(m.kind, m.data) for m in received} == {("relay", b"p" * 1000)}
        with pytest.raises(duprep.Timeout):
            sink.receive(timeout=0)
        assert sink.request(b"still fine") == b"still fine"


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(30)
        sock.sendall(data)
    except OSError:
        pass


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_burst_from_many_clients_holds_the_receiver_to_its_backlog_limit(gateway, instance):
    """300 clients each write 128 KiB of requests at once.  One wake-up of the receiver reports most
    of them readable; reading 64 KiB from each before looking at the backlog limit (1 MiB) took its
    peak memory up by about 28 MB, kept afterwards.  Every request is still answered."""
    import selectors
    gw = gateway()
    [receiver] = [p["pid"] for p in snapshot(instance)["processes"] if p["role"] == "receiver"]
    socks = [_raw(gw.port) for _ in range(300)]
    sel = selectors.DefaultSelector()
    one = encode_wire(Call(1, 1, 0, b"x" * 100))
    k = (128 * 1024) // len(one)
    try:
        for s in socks:
            s.sendall(encode_wire(Hello(1, "")))
        for s in socks:
            reader = FrameReader(1 << 20)
            while not reader.feed(s.recv(4096)):
                pass
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, [memoryview(one * k), 0, reader])
        base = _peak_rss_kib(receiver)
        done, deadline = 0, time.monotonic() + 60
        while done < len(socks) and time.monotonic() < deadline:
            for key, ev in sel.select(1):
                s, st = key.fileobj, key.data
                if ev & selectors.EVENT_WRITE and st[0]:
                    st[0] = st[0][s.send(st[0]):]
                    if not st[0]:
                        sel.modify(s, selectors.EVENT_READ, st)
                if ev & selectors.EVENT_READ:
                    try:
                        data = s.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    assert data, "the gateway closed a connection"
                    st[1] += len(st[2].feed(data))
                    if st[1] == k:
                        done += 1
                        sel.unregister(s)
        assert done == len(socks), f"only {done} of {len(socks)} clients got all {k} answers"
        grown = _peak_rss_kib(receiver) - base
        assert grown < 8 * 1024, f"the receiver's peak memory grew by {grown} KiB"
    finally:
        sel.close()
        for s in socks:
            s.close()


def test_backpressure_loses_nothing(gateway, instance):
    """Far more pipelined requests than the queues and the receiver's backlog hold: the receiver
    stops reading (TCP pushes back), and nothing is lost."""
    gw = gateway(workers=1)
    s = _raw(gw.port)
    try:
        s.sendall(encode_wire(Hello(1, "")))
        n = 2500       # about 3 MB against 2 x 80 KB of queues and a 1 MiB backlog, on a slowed worker
        payloads = {i: b"sleep:0.0005|" + os.urandom(random.Random(i).randrange(1000, 2500))
                    for i in range(1, n + 1)}
        sender = threading.Thread(target=lambda: s.sendall(
            b"".join(encode_wire(Call(i, 7, 0, p)) for i, p in payloads.items())))
        sender.start()
        reader, dec, got = FrameReader(1 << 20), frame.server_decoder(), {}
        while len(got) < n:
            data = s.recv(65536)
            assert data, "gateway closed the connection"
            for f in map(dec.decode, reader.feed(data)):
                if isinstance(f, frame.Reply):
                    got[f.msgid] = f.data
        sender.join(30)
        assert got == payloads
        wait_until(lambda: {p["role"]: p for p in snapshot(instance)["processes"]}["receiver"]["counters"]
                   ["backpressure_pauses"] >= 1, what="the receiver's pause to be counted")
    finally:
        s.close()


def _hello_from(port: int, source: str) -> socket.socket | frame.Error:
    """Connect from ``source`` (any 127/8 address), say HELLO; the socket if welcomed, else the ERROR."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(encode_wire(Hello(1, "")))
    reader, dec = FrameReader(1 << 20), frame.server_decoder()
    while True:
        data = s.recv(65536)
        frames = [dec.decode(b) for b in reader.feed(data)] if data else []
        if not data or frames:
            break
    if frames and isinstance(frames[0], frame.Welcome):
        return s
    s.close()
    assert frames, "closed without an ERROR frame"
    return frames[0]


def test_limits_max_clients_and_max_per_ip(gateway, instance):
    gw = gateway("--max-clients", "3", "--max-per-ip", "2")
    socks = [_hello_from(gw.port, "127.0.0.1"), _hello_from(gw.port, "127.0.0.1")]
    try:
        refused = _hello_from(gw.port, "127.0.0.1")
        assert isinstance(refused, frame.Error) and refused.code == ErrorCode.TOO_MANY_FROM_IP
        socks.append(_hello_from(gw.port, "127.0.0.2"))          # another address still gets in
        full = _hello_from(gw.port, "127.0.0.3")
        assert isinstance(full, frame.Error) and full.code == ErrorCode.SERVER_FULL
        assert all(isinstance(s, socket.socket) for s in socks)
        with pytest.raises(duprep.RefusedError) as info:
            duprep.Client("127.0.0.1", gw.port)
        assert info.value.code in (ErrorCode.TOO_MANY_FROM_IP, ErrorCode.SERVER_FULL)
        assert snapshot(instance)["refused"] == 3
    finally:
        for s in socks:
            if isinstance(s, socket.socket):
                s.close()


def test_sigterm_leaves_nothing_behind(gateway, instance):
    gw = gateway()
    family = [gw.pid, *descendants(gw.pid)]
    assert len(family) == 5
    with duprep.Client("127.0.0.1", gw.port) as c:
        assert c.request(b"x") == b"x"
        assert gw.stop() == 0
        with pytest.raises(duprep.RefusedError) as info:      # told why, not just cut off
            c.request(b"after stop", timeout=5)
        assert info.value.code == ErrorCode.SHUTTING_DOWN
    wait_until(lambda: not any(alive(p) for p in family), what="every gateway process to exit")
    assert ipc_leftovers(instance) == []


def test_graceful_stop_delivers_replies_already_in_flight(gateway, instance):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port) as c:
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(c.request(b"sleep:0.5|last", timeout=10)))
        t.start()
        wait_until(lambda: any(p["role"] == "worker" and p["counters"].get("queue_messages")
                               for p in snapshot(instance)["processes"]), what="a worker to take the request")
        assert gw.stop() == 0
        t.join(10)
        assert result == [b"sleep:0.5|last"]


def test_a_stop_after_a_receiver_restart_still_waits_for_the_answers(gateway, instance):
    """The receiver published its `requests` count within a second, so one killed right after a burst
    left its successor counting from behind the workers; the next stop's drain then saw the workers
    "ahead" and ended at once, cutting the requests still being handled (SHUTTING_DOWN instead of
    their answers)."""
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port, timeout=20) as c:
        for i in range(40):
            assert c.request(b"%d" % i) == b"%d" % i
        [victim] = [p for p in descendants(gw.pid) if comm(p) == "duprep-receiver"]
        os.kill(victim, signal.SIGKILL)               # before its next publication (up to 1 s later)
        wait_until(lambda: not alive(victim), what="the receiver to die")
        wait_until(lambda: [p for p in descendants(gw.pid) if comm(p) == "duprep-receiver" and p != victim
                            and alive(p)], what="a new receiver")
        _request_after_restart(c, b"after")
        results: list[object] = []

        def slow(i: int) -> None:
            try:
                results.append(c.request(b"sleep:2|%d" % i, timeout=20))
            except duprep.DuprepError as e:
                results.append(e)
        threads = [threading.Thread(target=slow, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(p["counters"].get("held", 0) for p in snapshot(instance)["processes"]
                               if p["role"] == "worker" and alive(p["pid"])) == 2,
                   what="the workers to hold both slow requests")
        assert gw.stop(timeout=30) == 0
        for t in threads:
            t.join(10)
        assert sorted(map(repr, results)) == [repr(b"sleep:2|0"), repr(b"sleep:2|1")]


def test_a_stop_that_finds_the_sender_restarting_still_delivers_what_is_queued(gateway, instance):
    """SIGTERM while the sender is down (killed, inside its restart delay) with answers on the reply
    queue: the gateway starts a sender for the drain, so every client gets its answer and then
    SHUTTING_DOWN (the stop used to skip the sender step: answers lost, exit 0 all the same)."""
    gw = gateway()
    socks = [_raw(gw.port) for _ in range(5)]
    readers = [FrameReader(1 << 20) for _ in socks]
    try:
        for s, r in zip(socks, readers):
            s.sendall(encode_wire(Hello(1, "")))
            assert isinstance(_frames(s, r, 1)[0], frame.Welcome)
        [victim] = [p for p in descendants(gw.pid) if comm(p) == "duprep-sender"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not alive(victim), what="the sender to die")
        for i, s in enumerate(socks):
            s.sendall(encode_wire(Call(1, 1, 0, b"r%d" % i)))
        wait_until(lambda: snapshot(instance)["queues"]["replies"]["messages"] >= 1, timeout=2,
                   what="answers on the reply queue")          # (the restart comes after 0.25 s)
        assert gw.stop() == 0
        for i, (s, r) in enumerate(zip(socks, readers)):
            got = _frames(s, r, 2)
            assert isinstance(got[0], frame.Reply) and got[0].data == b"r%d" % i
            assert isinstance(got[1], frame.Error) and got[1].code == ErrorCode.SHUTTING_DOWN
    finally:
        for s in socks:
            s.close()


def test_a_sender_killed_during_the_drain_is_replaced_and_the_answer_still_arrives(gateway, instance):
    """The sender dies while the stop drains, with an answer still to come: another sender is started,
    and the client gets its REPLY and then SHUTTING_DOWN (it used to get EOF, exit 0 all the same)."""
    gw = gateway()
    s = _raw(gw.port)
    reader = FrameReader(1 << 20)
    try:
        s.sendall(encode_wire(Hello(1, "")) + encode_wire(Call(1, 7, 0, b"sleep:2")))
        assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
        wait_until(lambda: any(r["counters"]["held"] for r in _worker_rows(instance)), what="a worker to take it")
        [sender] = [p for p in descendants(gw.pid) if comm(p) == "duprep-sender"]
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not [p for p in descendants(gw.pid) if comm(p) == "duprep-receiver"],
                   what="the stop to reach the sender's drain")
        os.kill(sender, signal.SIGKILL)
        reply, bye = _frames(s, reader, 2, timeout=20)
        assert isinstance(reply, frame.Reply) and reply.data == b"sleep:2"
        assert isinstance(bye, frame.Error) and bye.code == ErrorCode.SHUTTING_DOWN
        assert gw.proc.wait(30) == 0
    finally:
        s.close()


def test_a_worker_killed_during_the_stop_is_answered_for_and_the_drain_ends(gateway, instance):
    """A worker dies holding a request while the stop drains: its client gets WORKER_LOST, not a
    wait for the whole drain_timeout and then SHUTTING_DOWN."""
    gw = gateway("--drain-timeout", "30", workers=1)
    s = _raw(gw.port)
    reader = FrameReader(1 << 20)
    try:
        s.sendall(encode_wire(Hello(1, "")) + encode_wire(Call(1, 1, 0, b"sleep:60")))
        assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
        [row] = wait_until(lambda: [r for r in _worker_rows(instance) if r["counters"]["held"] == 1] or None,
                           what="the worker to take the request")
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: snapshot(instance)["state"] == "stopping", what="the stop to begin")
        os.kill(row["pid"], signal.SIGKILL)
        lost, bye = _frames(s, reader, 2, timeout=20)          # long before the 30 s drain timeout
        assert (lost.msgid, lost.code) == (1, ErrorCode.WORKER_LOST) and bye.code == ErrorCode.SHUTTING_DOWN
        assert gw.proc.wait(20) == 0
    finally:
        s.close()


def test_restart_after_kill_9_of_everything(gateway, instance):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port) as c:
        assert c.request(b"x") == b"x"
    family = [gw.pid, *descendants(gw.pid)]
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    gw.proc.wait()
    wait_until(lambda: not any(alive(p) for p in family), what="the killed processes to die")
    assert ipc_leftovers(instance), "kill -9 should have left objects to recover from"
    gw2 = gateway()
    with duprep.Client("127.0.0.1", gw2.port) as c:
        assert c.request(b"after restart") == b"after restart"
    assert gw2.stop() == 0


def test_restart_after_kill_9_of_the_acceptor_only(gateway, instance):
    gw = gateway()
    family = descendants(gw.pid)
    os.kill(gw.pid, signal.SIGKILL)
    gw.proc.wait()
    wait_until(lambda: not any(alive(p) for p in family), what="orphaned children to exit by themselves")
    gw2 = gateway()
    with duprep.Client("127.0.0.1", gw2.port) as c:
        assert c.request(b"y") == b"y"


@pytest.mark.parametrize("size", [0, 100])
def test_a_table_cut_short_by_a_crash_blocks_neither_start_nor_cleanup(gateway, instance, size):
    """A gateway killed between creating its table and sizing it leaves a segment shorter than a table:
    cleanup and the next start remove it instead of failing on it."""
    from duprep import ipcnames
    path = os.path.join(ipcnames.SHM_DIR, ipcnames.table_name(instance))

    def leave_one() -> None:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
    leave_one()
    out = duprep_cli("cleanup", "--instance", instance)
    assert out.returncode == 0 and ipcnames.table_name(instance) in out.stdout, out.stderr
    assert not os.path.exists(path)
    leave_one()
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port) as c:
        assert c.request(b"started") == b"started"


def test_second_gateway_with_the_same_instance_refuses(gateway, instance):
    gw = gateway()
    out = duprep_cli("serve", "--instance", instance, "--port", "0", "--workers", "0")
    assert out.returncode == EXIT_BUSY
    assert "already served by a running gateway" in out.stderr
    with duprep.Client("127.0.0.1", gw.port) as c:          # the first one is untouched
        assert c.request(b"z") == b"z"


def test_queue_limit_error_names_the_limit(instance):
    out = duprep_cli("serve", "--instance", instance, "--port", "0", "--workers", "0", "--queue-depth", "100000")
    assert out.returncode == EXIT_LIMIT
    assert "fs.mqueue.msg_max" in out.stderr and "Invalid parameter" in out.stderr
    assert ipc_leftovers(instance) == []


def test_idle_gateway_uses_no_cpu(gateway):
    gw = gateway()
    clients = [duprep.Client("127.0.0.1", gw.port) for _ in range(20)]
    try:
        for c in clients:
            c.request(b"warm")
        pids = [gw.pid, *descendants(gw.pid)]

        def cpu() -> float:
            total = 0
            for p in pids:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            return total / os.sysconf("SC_CLK_TCK")

        before, t0 = cpu(), time.monotonic()
        time.sleep(3)                     # measuring an interval, not synchronising
        used = cpu() - before
        elapsed = time.monotonic() - t0
        assert used / elapsed < 0.02, f"idle gateway used {used:.3f} s CPU in {elapsed:.1f} s"
    finally:
        for c in clients:
            c.close()


def test_status_text_and_json(gateway, instance):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port, name="watched") as c:
        c.request(b"abc")
        text = duprep_cli("status", "--instance", instance)
        assert text.returncode == 0 and "watched" in text.stdout and "receiver" in text.stdout
        def counted():
            snap = json.loads(duprep_cli("status", "--instance", instance, "--json").stdout)
            [conn] = snap["connections"]
            return snap if (conn["frames_in"], conn["frames_out"]) == (2, 2) else None
        snap = wait_until(counted, what="the counters to reach the table")
        [conn] = snap["connections"]
        assert conn["name"] == "watched" and conn["bytes_in"] > 0 and conn["bytes_out"] > 0
        assert {p["role"] for p in snap["processes"]} == {"acceptor", "receiver", "sender", "worker"}
        assert (snap["heartbeat"], snap["hang_timeout"], snap["host"]) == (30.0, 120.0, "127.0.0.1")
        # Ages are as of the snapshot, however late it is rendered (the demo renders one at the end).
        [row] = [line for line in render(snap).splitlines() if "watched" in line]
        [later] = [line for line in render(dict(snap, time=snap["time"] + 600)).splitlines() if "watched" in line]
        assert "10m" not in row and later.count("10m") == 2, (row, later)
    missing = duprep_cli("status", "--instance", instance + "-nope")
    assert missing.returncode == 3 and "not running" in missing.stderr


@pytest.mark.parametrize("role", ["duprep-receiver", "duprep-sender", "duprep-worker"])
def test_a_crashed_child_is_restarted_and_clients_carry_on(gateway, instance, role):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port, name="survivor") as c:
        assert c.request(b"before") == b"before"
        [victim, *_] = [p for p in descendants(gw.pid) if comm(p) == role]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not alive(victim), what="the victim to die")
        wait_until(lambda: any(comm(p) == role and p != victim for p in descendants(gw.pid)),
                   what=f"a new {role}")
        wait_until(lambda: [p for p in snapshot(instance)["processes"]
                            if p["pid"] != victim and comm(p["pid"]) == role], what="the new one to be up")
        _request_after_restart(c, b"after")
        restarts = {p["role"]: p for p in snapshot(instance)["processes"]}["acceptor"]["counters"]["restarts"]
        assert restarts == 1


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_worker_that_dies_while_the_gateway_boots_is_replaced(instance):
    """Respawning used to wait for "ready": a worker killed while the receiver and sender were still
    booting was logged as "restarting" and never came back, and the gateway served without a worker."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "duprep", "serve", "--instance", instance, "--port", "0",
                             "--workers", "1", "--app", "tests.apps:handle"], env=env, stderr=subprocess.DEVNULL)
    stopped = -1
    try:
        def children() -> dict[str, int]:
            try:
                with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                return {}
            return {role: p for p in pids for role in ("receiver", "worker") if f"{role} " in _cmdline(p)}
        kids: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while len(kids) < 2 and time.monotonic() < deadline:   # (no sleep: the receiver boots in ms)
            kids = children()
        os.kill(kids["receiver"], signal.SIGSTOP)     # a slow boot: the gateway cannot be ready meanwhile
        stopped = kids["receiver"]
        os.kill(kids["worker"], signal.SIGKILL)
        wait_until(lambda: children().get("worker", kids["worker"]) != kids["worker"], timeout=20,
                   what="a new worker while the gateway boots")
        assert snapshot(instance)["state"] == "booting"
        os.kill(stopped, signal.SIGCONT)
        stopped = -1
        wait_until(lambda: snapshot(instance)["state"] == "ready", what="the gateway to be ready")
        with duprep.Client("127.0.0.1", snapshot(instance)["port"]) as c:
            assert c.request(b"served", timeout=20) == b"served"
    finally:
        if stopped > 0:
            os.kill(stopped, signal.SIGCONT)
        family = [proc.pid, *descendants(proc.pid)]
        proc.terminate()
        proc.wait(30)
        for pid in family:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_stop_ends_even_when_the_sender_it_waits_for_never_finishes_booting(gateway, instance):
    """SIGTERM while the receiver is down and a restarted sender is still booting: the stop waited
    for the sender's READY with no deadline; a sender stuck in its boot hung the stop for ever."""
    gw = gateway()

    def child(role: str) -> int:
        try:
            with open(f"/proc/{gw.pid}/task/{gw.pid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return 0
        return next((p for p in pids if f"gateway.{role} " in _cmdline(p)), 0)
    old_sender, receiver = child("sender"), child("receiver")
    os.kill(old_sender, signal.SIGKILL)
    new_sender = 0
    deadline = time.monotonic() + 30
    while new_sender in (0, old_sender) and time.monotonic() < deadline:   # (no sleep: it boots in ms)
        new_sender = child("sender")
    os.kill(new_sender, signal.SIGSTOP)             # stuck in its boot
    try:
        assert {p["role"]: p for p in snapshot(instance)["processes"]}["sender"]["pid"] != new_sender
        os.kill(receiver, signal.SIGKILL)
        wait_until(lambda: not alive(receiver), what="the receiver to die")
        gw.proc.send_signal(signal.SIGTERM)         # before the receiver's restart
        gw.proc.wait(60)                            # ended (the stuck sender killed), not hung
        assert not alive(new_sender)
    finally:
        if alive(new_sender):
            os.kill(new_sender, signal.SIGKILL)


def test_what_is_queued_while_the_sender_restarts_is_delivered_and_closes_free_slots(gateway, instance):
    """While the sender is down, one client's request is answered into the reply queue and 20 others
    close: the new sender must deliver the answer and end the closed connections (it used to read
    the queue before it had the connections back, drop all that as stale, and leak the slots)."""
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port, name="waiting", timeout=20) as waiting:
        leaving = [duprep.Client("127.0.0.1", gw.port, name=f"leaving{i}") for i in range(20)]
        [victim] = [p for p in descendants(gw.pid) if comm(p) == "duprep-sender"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not alive(victim), what="the sender to die")
        for c in leaving:
            c.close()
        assert waiting.request(b"across the restart", timeout=20) == b"across the restart"
        wait_until(lambda: [c["name"] for c in snapshot(instance)["connections"]] == ["waiting"],
                   what="the slots of the clients that left to be freed")
        procs = {p["role"]: p for p in snapshot(instance)["processes"]}
        assert procs["sender"]["counters"]["dropped_stale"] == 0


def test_a_connection_the_dead_sender_left_inside_a_frame_is_ended_not_corrupted(gateway, instance):
    """The sender dies with half a frame written to a client that does not read: the new sender must
    end that connection (the next frame would be read as the rest of the cut one), and only that one."""
    from duprep import ipcnames
    from duprep.table import SendFlag, Table
    gw = gateway()
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(("127.0.0.1", gw.port))
    hog.settimeout(20)
    table = Table.attach(ipcnames.table_name(instance))
    try:
        with duprep.Client("127.0.0.1", gw.port, name="bystander") as other:
            hog.sendall(encode_wire(Hello(1, "hog")) +
                        b"".join(encode_wire(Call(i, 1, 0, b"h" * 7000)) for i in range(1, 41)))  # 280 KB back
            [sid] = wait_until(lambda: [c["sid"] for c in snapshot(instance)["connections"] if c["name"] == "hog"]
                               or None, what="the hog's HELLO")
            wait_until(lambda: table.s_part(sid).read()[1] & SendFlag.HALF_WRITTEN,
                       what="a write to the hog to stop inside a frame")
            [victim] = [p for p in descendants(gw.pid) if comm(p) == "duprep-sender"]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: {p["role"]: p for p in snapshot(instance)["processes"]}["sender"]["counters"]
                       .get("half_written") == 1, what="the new sender to end the hog's connection")
            try:
                hog.sendall(encode_wire(Call(99, 1, 0, b"after")))  # its reply would follow the cut frame
            except OSError:
                pass                                                # (reset: the connection is gone)
            replies = _frames_until_end(hog, FrameReader(1 << 20))
            assert all(isinstance(f, frame.Welcome) or (isinstance(f, frame.Reply) and f.data == b"h" * 7000)
                       for f in replies)
            _request_after_restart(other, b"still here")
    finally:
        hog.close()
        table.close()


def test_a_connection_the_dead_receiver_left_inside_a_frame_is_ended_not_misread(gateway, instance):
    """The receiver dies holding the start of a frame: the new one must end that connection, not read
    the rest of the frame as new frames (here the rest is itself a well-formed REQUEST: a phantom)."""
    from duprep import ipcnames
    from duprep.table import SlotFlag, Table
    gw = gateway()
    s = _raw(gw.port)
    table = Table.attach(ipcnames.table_name(instance))
    try:
        inner = encode_wire(Call(666, 1, 0, b"phantom"))
        outer = encode_wire(Call(1, 1, 0, inner))
        s.sendall(encode_wire(Hello(1, "")) + outer[:len(outer) - len(inner)])   # cut where inner starts
        reader, dec = FrameReader(1 << 20), frame.server_decoder()
        [welcome] = map(dec.decode, reader.feed(s.recv(65536)))
        assert isinstance(welcome, frame.Welcome)
        wait_until(lambda: table.r_part(welcome.sid).read()[1] & SlotFlag.HALF_READ,
                   what="the receiver to hold the start of the frame")
        _kill_receiver(gw, instance)
        try:
            s.sendall(inner)
        except OSError:
            pass                                   # reset: the connection is gone already
        got = _frames_until_end(s, reader)
        assert not [f for f in got if getattr(f, "msgid", 0) == 666], "the rest of a frame was read as a frame"
        wait_until(lambda: {p["role"]: p for p in snapshot(instance)["processes"]}["receiver"]["counters"]
                   ["half_read"] == 1, what="the cut connection to be counted")
        with duprep.Client("127.0.0.1", gw.port) as c:      # everyone else carries on
            assert c.request(b"fine", timeout=20) == b"fine"
    finally:
        s.close()
        table.close()


def test_connections_a_dead_receiver_had_ended_stay_ended(gateway, instance):
    """The receiver ends two connections for protocol violations (HELLO twice; a frame above max_frame)
    while the reply queue is full, so their ERROR and Close wait in its backlog; then it is killed.
    Its successor must not read them again (the rest of the refused frame would be executed as a
    phantom request), and the sender must end them although their Close died with the receiver."""
    from duprep.frame import LENGTH
    gw = gateway()
    filler, bad_hello, too_large = (_raw(gw.port) for _ in range(3))
    readers = {}
    try:
        for s in (filler, bad_hello, too_large):
            readers[s] = FrameReader(1 << 20)
            s.sendall(encode_wire(Hello(1, "")))
            assert isinstance(_frames(s, readers[s], 1)[0], frame.Welcome)
        [sender] = [p for p in descendants(gw.pid) if comm(p) == "duprep-sender"]
        os.kill(sender, signal.SIGSTOP)
        try:
            filler.setblocking(False)
            try:
                filler.send(b"".join(encode_wire(Call(i, 1, 0, b"f" * 3000)) for i in range(1, 200)))
            except BlockingIOError:
                pass
            wait_until(lambda: snapshot(instance)["queues"]["replies"]["messages"] == 10,
                       what="the reply queue to fill up")
            bad_hello.sendall(encode_wire(Hello(1, "again")))
            too_large.sendall(LENGTH.pack(10_000_000))
            wait_until(lambda: snapshot(instance)["processes"][1]["counters"]["protocol_errors"] == 2,
                       timeout=5, what="both violations to be seen")
            _kill_receiver(gw, instance)
        finally:
            os.kill(sender, signal.SIGCONT)
        for s, msgid in ((bad_hello, 77), (too_large, 666)):
            try:
                s.sendall(encode_wire(Call(msgid, 1, 0, b"must never run")))
            except OSError:
                pass
            got = _frames_until_end(s, readers[s])
            assert not [f for f in got if isinstance(f, frame.Reply)], got
    finally:
        for s in (filler, bad_hello, too_large):
            s.close()


def test_while_a_queue_is_full_what_comes_meanwhile_waits_in_one_message_not_one_each(gateway, instance):
    """Requests read while the request queue is full, and replies made while the reply queue is full,
    collect in the open queue message instead of a message each: the stage that is behind then takes a
    few full messages (each is a wake-up of every process on the way), not a queue's worth of small ones.
    Each request below is read (or answered) in a wake-up of its own, which used to make it a message."""
    gw = gateway(workers=1)
    s = _raw(gw.port)
    reader = FrameReader(1 << 20)
    [worker] = wait_until(lambda: _roles(instance).get("worker"), what="the worker")
    [sender] = _roles(instance)["sender"]

    def counter(role: str, name: str) -> int:
        return next(p["counters"][name] for p in snapshot(instance)["processes"] if p["role"] == role)

    def depth(queue: str) -> int:
        return snapshot(instance)["queues"][queue]["messages"]

    msgid = iter(range(1, 1000))
    late = 6

    def one_at_a_time(stopped: int, tag: bytes, queue: str, done: Callable[[int], bool], cap: int) -> None:
        """With ``stopped`` stopped, cap + late requests, each sent once the one before is ``done``:
        cap of them fill ``queue``; then every answer comes once ``stopped`` is continued."""
        os.kill(stopped, signal.SIGSTOP)
        try:
            for i in range(1, cap + late + 1):
                s.sendall(encode_wire(Call(next(msgid), 7, 0, tag + b"%d" % i)))
                wait_until(lambda: done(i), what=f"{tag!r} {i} to be taken")
                if i <= cap:
                    wait_until(lambda: depth(queue) == i, what=f"{tag!r} {i} on the {queue} queue")
        finally:
            os.kill(stopped, signal.SIGCONT)
        got = _frames(s, reader, cap + late)
        assert sorted(f.data for f in got) == sorted(tag + b"%d" % i for i in range(1, cap + late + 1)), got

    try:
        s.sendall(encode_wire(Hello(1, "")))
        assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
        cap = snapshot(instance)["queues"]["requests"]["capacity"]
        assert snapshot(instance)["queues"]["replies"]["capacity"] == cap
        # Requests: the worker is stopped; cap of them fill the queue, the next one waits for room
        # in a message of its own, and the later ones join the receiver's open message.
        taken = counter("worker", "queue_messages")
        one_at_a_time(worker, b"q", "requests", lambda i: counter("receiver", "frames_in") == 1 + i, cap)
        assert counter("worker", "queue_messages") - taken == cap + 2
        # Replies: the sender is stopped; each request is answered alone, cap answers fill the
        # queue, the next waits in the worker in a message of its own, the later ones join one.
        # (the sender publishes its counters a moment after it works: both from one publication)
        wait_until(lambda: counter("sender", "frames_out") == 1 + cap + late, what="the sender's count")
        delivered = counter("sender", "queue_messages")
        one_at_a_time(sender, b"r", "replies", lambda i: counter("worker", "replies") == cap + late + i, cap)
        wait_until(lambda: counter("sender", "frames_out") == 1 + 2 * (cap + late), what="the sender's count")
        assert counter("sender", "queue_messages") - delivered == cap + 2
    finally:
        s.close()


def test_requests_that_die_in_the_receivers_backlog_are_not_counted(gateway, instance):
    """Requests a killed receiver still held in its backlog (request queue full) never reach a worker:
    they must not count as queued, or every later stop waits drain_timeout for their answers."""
    gw = gateway()
    s = _raw(gw.port)
    reader = FrameReader(1 << 20)
    workers = [r["pid"] for r in wait_until(lambda: len(_worker_rows(instance)) == 2 and _worker_rows(instance),
                                            what="both workers")]
    try:
        s.sendall(encode_wire(Hello(1, "")))
        assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        for i in range(1, 11):              # one queue message each, until the queue is full
            s.sendall(encode_wire(Call(i, 7, 0, b"r%d" % i)))
            wait_until(lambda: snapshot(instance)["queues"]["requests"]["messages"] == i, what=f"request {i} queued")
        s.sendall(b"".join(encode_wire(Call(i, 7, 0, b"r%d" % i)) for i in range(11, 16)))   # the backlog
        wait_until(lambda: snapshot(instance)["processes"][1]["counters"]["frames_in"] == 16,
                   what="the last five to be read")
        _kill_receiver(gw, instance)
    finally:
        for w in workers:
            os.kill(w, signal.SIGCONT)
    try:
        def counts():
            procs = snapshot(instance)["processes"]
            return (procs[1]["counters"]["requests"],
                    sum(p["counters"]["requests"] for p in procs if p["role"] == "worker"))
        wait_until(lambda: counts() == (10, 10), what="the receiver's count to match what the workers got")
    finally:
        s.close()


def test_request_with_an_unusual_array_header_or_extra_elements_is_served(gateway):
    """msgpack allows array16 for 5 elements, and the protocol ignores extra elements (protocol.md 1.3):
    the receiver's fast path takes neither, the slow path takes both and drops the extras, whatever the
    header width.  (Extras once reached the worker's Request and filled its later fields: a trailing True
    made a REQUEST one-way, never answered.)"""
    gw = gateway()
    s = _raw(gw.port)
    bodies = [
        b"\xdc\x00\x05\x02\x07\x01\x00\xc4\x03abc",                  # array16, 5 elements
        b"\x96\x02\x08\x01\x00\xc4\x03abc\xa2zz",                      # fixarray, one extra str
        b"\x9a\x02\x09\x01\x00\xc4\x03abc\x00\x00\xa0\xcb" + bytes(8) + b"\xc3",   # extras ending in True
        b"\xdc\x00\x0a\x02\x0a\x01\x00\xc4\x03abc\x00\x00\xa0\xcb" + bytes(8) + b"\xc3",   # the same, array16
    ]
    try:
        s.sendall(encode_wire(Hello(1, "")) + b"".join(struct.pack(">I", len(b)) + b for b in bodies))
        reader, dec, got = FrameReader(1 << 20), frame.server_decoder(), []
        while len([f for f in got if isinstance(f, (frame.Reply, frame.Error))]) < len(bodies):
            data = s.recv(65536)
            assert data, f"connection ended; frames received: {got}"
            got += [dec.decode(b) for b in reader.feed(data)]
        answers = sorted((f for f in got if isinstance(f, (frame.Reply, frame.Error))), key=lambda f: f.msgid)
        assert answers == [frame.Reply(m, 1, b"abc") for m in (7, 8, 9, 10)]
    finally:
        s.close()


def test_an_app_that_cannot_boot_halts_the_gateway(instance):
    out = duprep_cli("serve", "--instance", instance, "--port", "0", "--app", "duprep.apps.echo:no_such_handler")
    assert out.returncode == 3
    assert "no attribute 'no_such_handler'" in out.stderr and "cannot start" in out.stderr
    assert out.stderr.count("spawned") == 0 and "restarting" not in out.stderr
    assert ipc_leftovers(instance) == []
    out = duprep_cli("serve", "--instance", instance, "--port", "0", "--app", "no.such.module:handle")
    assert out.returncode == 4 and "cannot find module 'no.such.module'" in out.stderr


def test_one_client_many_threads_replies_matched_out_of_order(gateway):
    gw = gateway(workers=3)
    with duprep.Client("127.0.0.1", gw.port, timeout=30) as c:
        failures: list[str] = []

        def run(t: int) -> None:
            rng = random.Random(t)
            for n in range(30):
                # sleeps of different lengths make replies overtake each other
                payload = b"sleep:%.3f|%d:%d:" % (rng.choice((0, 0, 0.002, 0.01)), t, n) + rng.randbytes(20)
                if c.request(payload) != payload:
                    failures.append(f"thread {t} request {n}")

        threads = [threading.Thread(target=run, args=(t,)) for t in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures


def test_external_workers_join_a_gateway_started_without_an_app(gateway, instance):
    gw = gateway("--app", "none", workers=0)
    with duprep.Client("127.0.0.1", gw.port) as c:
        with pytest.raises(duprep.Timeout):
            c.request(b"nobody home", timeout=0.2)          # queued; no worker yet
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import subprocess
        import sys
        worker = subprocess.Popen([sys.executable, "-m", "duprep", "worker", "--instance", instance,
                                   "--app", "tests.apps:handle", "-n", "2"], env=env)
        try:
            late = c.receive(timeout=20)                     # the queued one is served once a worker joins
            assert (late.kind, late.data) == ("late", b"nobody home")
            pids = {c.request(b"pid") for _ in range(20)}
            assert len(pids) >= 1 and all(p.isdigit() for p in pids)
            assert gw.stop() == 0
            assert worker.wait(20) == 0                      # workers leave when their gateway does
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def test_oversized_payloads_get_a_clear_error_on_both_sides(gateway):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port) as c:
        fits = b"x" * (c.max_frame - 20)
        assert c.request(fits) == fits
        with pytest.raises(duprep.ProtocolError, match="max_frame"):
            c.request(b"x" * (c.max_frame + 1))
        assert c.request(b"still usable") == b"still usable"


def test_a_largest_frame_from_a_client_with_the_longest_name_is_served(gateway):
    """A REQUEST of max_frame bytes from a client with a 64-character name fits a Chunk with the name (a
    room reckoned with 4 bytes a name character once left it a few bytes over, and the receiver looped on
    it for ever), and the next frame in the same read starts the next Chunk."""
    gw = gateway()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        reader = FrameReader(1 << 20)
        s.sendall(encode_wire(Hello(1, "n" * 64)))
        [welcome] = _frames(s, reader, 1)
        overhead = len(msgspec.msgpack.encode(Call(1, 1, 0, b"x" * 300))) - 300
        data = os.urandom(welcome.max_frame - overhead)
        big = encode_wire(Call(1, 1, 0, data))
        assert len(big) - 4 == welcome.max_frame
        s.sendall(big + encode_wire(Call(2, 1, 0, b"after")))          # one read holds both, most likely
        replies = sorted(_frames(s, reader, 2), key=lambda r: r.msgid)
        assert [(type(r), r.msgid, r.data) for r in replies] == [(frame.Reply, 1, data), (frame.Reply, 2, b"after")]


def test_connection_level_errors_reach_waiting_requests_with_their_code(gateway):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port) as c:
        c._sock.sendall(struct.pack(">I", 7) + b"\x95\x02\xff\x01\x01\xc4\x00")   # a REQUEST with a bad field
        with pytest.raises(duprep.RefusedError) as info:
            # slow, so that the other worker cannot answer it before the connection ends
            c.request(b"sleep:1", timeout=10)
        assert info.value.code == ErrorCode.BAD_FRAME


def test_relay_from_an_anonymous_client_names_its_sid(gateway):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port) as anon, duprep.Client("127.0.0.1", gw.port, name="bob") as bob:
        anon.relay("bob", b"psst")
        msg = bob.receive(timeout=10)
        assert (msg.kind, msg.source, msg.data) == ("relay", f"#{anon.sid}", b"psst")


def test_names_are_limited_to_64_bytes_of_utf8(gateway):
    gw = gateway()
    with duprep.Client("127.0.0.1", gw.port, name="\u20ac" * 21) as ok:     # 63 bytes
        assert ok.request(b"x") == b"x"
    with pytest.raises(duprep.RefusedError) as info:
        duprep.Client("127.0.0.1", gw.port, name="\u20ac" * 22)               # 66 bytes
    assert info.value.code == ErrorCode.BAD_HELLO


def test_mass_disconnect_frees_every_slot(gateway, instance):
    """Thousands of release records at once must not overflow the control channel (nothing is lost)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(2000, max(0, min(soft, hard) - 200))
    gw = gateway("--max-clients", str(n))
    hello = encode_wire(Hello(1, ""))
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            s.sendall(hello)
            socks.append(s)
        wait_until(lambda: sum(c["ready"] for c in snapshot(instance)["connections"]) == n, timeout=60,
                   what="every client to be welcomed")
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: not snapshot(instance)["connections"], timeout=60, what="every slot to be freed")
    with duprep.Client("127.0.0.1", gw.port) as c:     # and the table is usable to the last slot
        assert c.request(b"after") == b"after"


def test_graceful_stop_answers_every_request_already_read(gateway, instance):
    """SIGTERM with seconds of work queued: everything the receiver read is answered before the end."""
    gw = gateway()
    s = _raw(gw.port)
    try:
        s.sendall(encode_wire(Hello(1, "")))
        n = 1000
        s.sendall(b"".join(encode_wire(Call(i, 7, 0, b"sleep:0.005|%d" % i)) for i in range(1, n + 1)))
        wait_until(lambda: {p["role"]: p for p in snapshot(instance)["processes"]}["receiver"]["counters"]
                   ["requests"] == n, what="the receiver to have read every request")
        gw.proc.send_signal(signal.SIGTERM)
        reader, dec, got, end = FrameReader(1 << 20), frame.server_decoder(), set(), None
        s.settimeout(30)
        while end is None:
            data = s.recv(65536)
            assert data, "closed without SHUTTING_DOWN"
            for f in map(dec.decode, reader.feed(data)):
                if isinstance(f, frame.Reply):
                    got.add(f.msgid)
                elif isinstance(f, frame.Error):
                    end = f
        assert end.code == ErrorCode.SHUTTING_DOWN and got == set(range(1, n + 1))
        assert gw.proc.wait(30) == 0
    finally:
        s.close()


def test_worker_api_in_this_process(gateway, instance):
    """bus.Worker used directly: receive_nowait, receive with a timeout, reply, clients, statistics."""
    gw = gateway("--app", "none", workers=0)
    with bus.Worker(instance) as worker, duprep.Client("127.0.0.1", gw.port, name="direct") as c:
        with pytest.raises(duprep.WouldBlock):
            worker.receive_nowait()
        with pytest.raises(duprep.Timeout):
            worker.receive(timeout=0.05)
        result: list[bytes] = []
        t = threading.Thread(target=lambda: result.append(c.request(b"hello worker", timeout=10)))
        t.start()
        request = worker.receive(timeout=10)
        assert (request.data, request.client, request.sid) == (b"hello worker", "direct", c.sid)
        assert request.deadline > time.time()
        worker.reply(request, b"hello client")
        t.join(10)
        assert result == [b"hello client"]
        assert [x.name for x in worker.clients()] == ["direct"]
        stats = worker.statistics()
        assert stats.replies == 1 and stats.queue_messages == 1 and stats.held == 0


def test_run_handler_answers_every_kind_of_result_in_per_connection_runs(gateway, instance):
    """run_handler frames a message's replies per connection run: every kind of handler result
    still gets its own answer, runs longer than one Deliver are split, replies never reach the
    other connection of the same queue message, and requests and replies are counted once."""
    gw = gateway("--app", "none", workers=0)

    def handler(request: bus.Request) -> bytes | None:
        kind = request.data[:4]
        if kind == b"none":
            return None
        if kind == b"defr":
            return bus.DEFERRED
        if kind == b"fail":
            raise RuntimeError("failed on purpose")
        if kind == b"huge":
            return b"h" * (1 << 20)                     # larger than any frame this instance carries
        if kind == b"arry":
            return bytearray(request.data.upper())
        if kind == b"dble":
            return request.data * 20                    # replies outgrow the requests: runs overflow a Deliver
        return request.data

    kinds = [b"echo", b"none", b"arry", b"defr", b"fail", b"huge", b"echo", b"dble", b"echo"]
    socks, sent, batches = [], [], []
    dec = frame.server_decoder()
    for n in range(2):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.settimeout(10)
        s.sendall(encode_wire(Hello(frame.PROTOCOL_VERSION, "")))
        reader = FrameReader(1 << 20)
        while not [dec.decode(b) for b in reader.feed(s.recv(65536))]:    # WELCOME
            pass
        frames, mine = [], {}
        for i in range(1, 41):                          # 40 small frames, sent in one write
            msgid = 1000 * n + i                        # a reply on the wrong connection has an unknown msgid
            kind = kinds[i % len(kinds)]
            data = kind + b"|%d|" % msgid + b"p" * 40
            if i % 13 == 0:
                frames.append(encode_wire(frame.Send(msgid, 7, data)))     # one-way: never answered
            else:
                frames.append(encode_wire(Call(msgid, 7, 10_000, data)))
                mine[msgid] = (kind, data)
        socks.append((s, reader))
        sent.append(mine)
        batches.append(b"".join(frames))
    for (s, _), batch in zip(socks, batches):       # both connections' requests wait in one queue message
        s.sendall(batch)

    def queued() -> int:
        rows = [r for r in snapshot(instance)["processes"] if r["role"] == "receiver"]
        return rows[0]["counters"]["requests"] if rows else 0
    wait_until(lambda: queued() >= 80, 10, "all 80 frames read and queued")

    with bus.Worker(instance) as worker:
        t = threading.Thread(target=bus.run_handler, args=(worker, handler), kwargs={"stop": lambda: True})
        t.start()
        try:
            for (s, reader), mine in zip(socks, sent):
                got: dict[int, object] = {}
                expected = sum(1 for kind, _ in mine.values() if kind != b"none")
                while len(got) < expected:
                    for f in map(dec.decode, reader.feed(s.recv(65536))):
                        assert f.msgid in mine and f.msgid not in got, f"unexpected or repeated msgid {f.msgid}"
                        got[f.msgid] = f
                for msgid, (kind, data) in mine.items():
                    f = got.get(msgid)
                    if kind == b"none":
                        assert f is None
                    elif kind == b"echo":
                        assert isinstance(f, frame.Reply) and f.data == data
                    elif kind == b"arry":
                        assert isinstance(f, frame.Reply) and f.data == data.upper()
                    elif kind == b"dble":
                        assert isinstance(f, frame.Reply) and f.data == data * 20
                    elif kind == b"defr":
                        assert isinstance(f, frame.Defer)
                    elif kind == b"fail":
                        assert isinstance(f, frame.Error) and f.code == ErrorCode.APP_ERROR
                        assert "failed on purpose" in f.message
                    else:
                        assert isinstance(f, frame.Error) and "exceeds the largest frame" in f.message
            stats = worker.statistics()
            answered = sum(1 for m in sent for kind, _ in m.values() if kind != b"none")
            assert (stats.requests, stats.replies, stats.held) == (80, answered, 0)
            assert stats.queue_messages < 80 / 2              # batched: many requests per queue message
        finally:
            worker.interrupt()
            t.join(10)
            for s, _ in socks:
                s.close()
    assert not t.is_alive()


def test_a_killed_workers_requests_are_answered_worker_lost(gateway, instance):
    """kill -9 of a supervised worker holding requests: each gets ERROR WORKER_LOST at once (not a
    client timeout), counted; the connection carries on with the restarted worker; the counters add
    up so a stop does not wait; a worker killed while idle makes no false WORKER_LOST."""
    gw = gateway(workers=1)
    s = _raw(gw.port)
    reader = FrameReader(1 << 20)
    try:
        s.sendall(encode_wire(Hello(1, "")) +
                  b"".join(encode_wire(Call(i, 7, 0, b"sleep:30|%d" % i)) for i in range(1, 4)))
        assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
        [row] = wait_until(lambda: [r for r in _worker_rows(instance) if r["counters"]["held"] == 3] or None,
                           what="the worker to take the three requests in one message")
        os.kill(row["pid"], signal.SIGKILL)
        lost = _frames(s, reader, 3)
        assert sorted((f.msgid, f.cpid, f.code) for f in lost) == [(i, 7, ErrorCode.WORKER_LOST) for i in range(1, 4)]
        assert all("died before answering" in f.message for f in lost)

        def counters():
            procs = snapshot(instance)["processes"]
            by_role = {p["role"]: p["counters"] for p in procs}
            return by_role["acceptor"], by_role["receiver"], [p["counters"] for p in procs if p["role"] == "worker"]
        acceptor, receiver, workers = counters()
        assert acceptor["lost_in_workers"] == 3 and sum(w["lost"] for w in workers) == 3
        assert sum(w["requests"] for w in workers) == 3      # what the drain compares with the receiver's
        wait_until(lambda: counters()[1]["requests"] == 3, what="the receiver's count (published within 1 s)")

        s.sendall(encode_wire(Call(4, 7, 0, b"after")))
        [reply] = _frames(s, reader, 1)                                 # the restarted worker answers
        assert isinstance(reply, frame.Reply) and (reply.msgid, reply.data) == (4, b"after")
        [idle] = wait_until(lambda: [r for r in _worker_rows(instance)
                                     if alive(r["pid"]) and r["counters"]["held"] == 0] or None,
                            what="the restarted worker to wait for work")
        os.kill(idle["pid"], signal.SIGKILL)                           # holding nothing: nothing to answer
        wait_until(lambda: counters()[0]["restarts"] == 2, what="the second restart")
        s.sendall(encode_wire(Call(5, 7, 0, b"again")))
        [reply] = _frames(s, reader, 1)
        assert isinstance(reply, frame.Reply) and reply.msgid == 5
        assert counters()[0]["lost_in_workers"] == 3
    finally:
        s.close()


def test_the_next_worker_in_a_dead_external_workers_row_answers_what_it_held(gateway, instance):
    """An external worker (not supervised by the acceptor) killed holding requests: the next worker
    to attach takes its row and answers them with ERROR WORKER_LOST before serving."""
    import subprocess
    import sys
    gw = gateway("--app", "none", workers=0)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ext = subprocess.Popen([sys.executable, "-m", "duprep", "worker", "--instance", instance,
                            "--app", "tests.apps:handle", "-n", "1"], env=env)
    s = _raw(gw.port)
    reader = FrameReader(1 << 20)
    try:
        wait_until(lambda: _worker_rows(instance) or None, what="the external worker to attach")
        s.sendall(encode_wire(Hello(1, "")) +
                  b"".join(encode_wire(Call(i, 9, 0, b"sleep:30|%d" % i)) for i in range(1, 3)))
        assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
        [row] = wait_until(lambda: [r for r in _worker_rows(instance) if r["counters"]["held"] == 2] or None,
                           what="the worker to take both requests")
        ext.kill()
        ext.wait()
        with bus.Worker(instance) as worker:             # claims the free row: the dead one's
            assert worker._row.part.off == row["row"] * 128 + worker._table._procs_off
            lost = _frames(s, reader, 2)
            assert sorted((f.msgid, f.code) for f in lost) == [(1, ErrorCode.WORKER_LOST), (2, ErrorCode.WORKER_LOST)]
            [me] = [r for r in _worker_rows(instance) if r["pid"] == os.getpid()]
            assert (me["counters"]["lost"], me["counters"]["requests"], me["counters"]["held"]) == (2, 2, 0)
    finally:
        s.close()
        if ext.poll() is None:
            ext.kill()
            ext.wait()


@pytest.mark.parametrize("policy, expected", [((), os.SCHED_BATCH), (("--sched", "other"), os.SCHED_OTHER)])
def test_every_gateway_process_runs_under_the_chosen_cpu_policy(gateway, instance, policy, expected):
    """SCHED_BATCH by default (no wake-up preemption inside the pipeline), SCHED_OTHER on request;
    the workers, started as separate commands, get the same policy as the rest."""
    gw = gateway(*policy)
    wait_until(lambda: [p["role"] for p in snapshot(instance)["processes"]].count("worker") == 2,
               what="both workers to attach")
    procs = snapshot(instance)["processes"]
    assert {p["role"]: os.sched_getscheduler(p["pid"]) for p in procs} == \
        {"acceptor": expected, "receiver": expected, "sender": expected, "worker": expected}
    assert os.sched_getscheduler(gw.pid) == expected


def _roles(instance: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p in snapshot(instance)["processes"]:
        if alive(p["pid"]):
            out.setdefault(p["role"], []).append(p["pid"])
    return out


def test_a_worker_stuck_in_its_handler_is_aborted_with_its_traceback_answered_for_and_replaced(gateway, instance):
    """A handler that never returns: after --hang-timeout without a heartbeat the acceptor aborts the
    worker (SIGABRT: faulthandler logs where it hung), the request gets WORKER_LOST, a new worker
    serves; the idle receiver and sender, beating every --heartbeat, are left alone."""
    with tempfile.TemporaryFile() as log:
        gw = gateway("--heartbeat", "0.5", "--hang-timeout", "2", workers=1, stderr=log.fileno())
        s = _raw(gw.port)
        reader = FrameReader(1 << 20)
        try:
            s.sendall(encode_wire(Hello(1, "")) + encode_wire(Call(1, 7, 0, b"sleep:3600")))
            assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
            before = wait_until(lambda: (r := _roles(instance)).get("worker") and r, what="the worker's row")
            [lost] = _frames(s, reader, 1, timeout=30)
            assert isinstance(lost, frame.Error) and (lost.msgid, lost.code) == (1, ErrorCode.WORKER_LOST)
            s.sendall(encode_wire(Call(2, 7, 0, b"after")))
            [reply] = _frames(s, reader, 1, timeout=30)
            assert isinstance(reply, frame.Reply) and reply.data == b"after"
            after = _roles(instance)
            assert after["worker"] != before["worker"]
            assert (after["receiver"], after["sender"]) == (before["receiver"], before["sender"])
            counters = {p["role"]: p["counters"] for p in snapshot(instance)["processes"]}["acceptor"]
            assert counters["hung"] == 1 and counters["lost_in_workers"] == 1
        finally:
            s.close()
        gw.stop(timeout=30)
        log.seek(0)
        text = log.read().decode(errors="replace")
    assert "showed no sign of life" in text and "SIGABRT" in text
    assert "Fatal Python error: Aborted" in text and "in handle" in text    # faulthandler: where it hung


def test_a_stopped_receiver_is_replaced_and_clients_carry_on(gateway, instance):
    """SIGSTOP freezes the receiver: the acceptor finds it silent, aborts it (SIGABRT with SIGCONT, so
    a stopped process acts on it) and starts another, which takes over the connections."""
    gw = gateway("--heartbeat", "0.5", "--hang-timeout", "2", workers=1)
    with duprep.Client("127.0.0.1", gw.port, name="patient", timeout=30) as c:
        assert c.request(b"before") == b"before"
        [victim] = _roles(instance)["receiver"]
        os.kill(victim, signal.SIGSTOP)
        try:
            wait_until(lambda: not alive(victim), timeout=20, what="the stopped receiver to be aborted")
        finally:
            if alive(victim):
                os.kill(victim, signal.SIGKILL)
        assert c.request(b"after", timeout=30) == b"after"
        counters = {p["role"]: p["counters"] for p in snapshot(instance)["processes"]}["acceptor"]
        assert counters["hung"] == 1 and counters["restarts"] == 1


def test_a_client_host_that_vanishes_without_closing_is_found_by_keepalive(gateway, instance):
    """A peer gone without FIN or RST (power cut; simulated by closing in TCP_REPAIR mode, which sends
    nothing) used to hold its slot for the kernel's two hours of keepalive; with --keepalive 2 the
    gateway probes it after 2 s of silence and frees the slot.  Other clients are not touched."""
    TCP_REPAIR = 19
    gw = gateway("--keepalive", "2")
    with duprep.Client("127.0.0.1", gw.port, name="alive") as alive_client:
        ghost = _raw(gw.port)
        ghost.sendall(encode_wire(Hello(1, "ghost")))
        assert isinstance(_frames(ghost, FrameReader(1 << 20), 1)[0], frame.Welcome)
        try:
            ghost.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except PermissionError:
            ghost.close()
            pytest.skip("TCP_REPAIR needs CAP_NET_ADMIN")
        ghost.close()                  # in repair mode: no FIN, no RST, the peer just stops answering
        wait_until(lambda: [c["name"] for c in snapshot(instance)["connections"]] == ["alive"], timeout=30,
                   what="the vanished client's slot to be freed")
        assert alive_client.request(b"still here") == b"still here"


def test_no_connection_is_starved_while_a_flood_fills_the_receivers_backlog(gateway, instance):
    """40 clients flood 4 KiB SENDs while a probe client does request/reply.  Past its 1 MiB read budget
    the receiver used to skip the connections epoll reported last -- the same ones every wake-up: some
    flooders never got a byte read and the probe's request waited for the whole flood."""
    import selectors
    from duprep.frame import Send
    gw = gateway()
    payload = b"".join(encode_wire(Send(i, 0, b"z" * 4000)) for i in range(16))
    sel = selectors.DefaultSelector()
    socks = []
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with duprep.Client("127.0.0.1", gw.port, name="probe", timeout=30) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                assert c.request(b"p") == b"p"
                latencies.append(time.monotonic() - t0)
    try:
        for i in range(40):
            s = _raw(gw.port)
            s.sendall(encode_wire(Hello(1, f"f{i}")))
            assert isinstance(_frames(s, FrameReader(1 << 20), 1)[0], frame.Welcome)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_WRITE, [memoryview(payload)])
            socks.append(s)
        prober = threading.Thread(target=probe)
        prober.start()
        end = time.monotonic() + 4
        while time.monotonic() < end:
            for key, _ in sel.select(0.1):
                st = key.data
                try:
                    st[0] = st[0][key.fileobj.send(st[0]):] or memoryview(payload)
                except BlockingIOError:
                    pass
        stop.set()
        prober.join(30)
        assert latencies and max(latencies) < 3, f"probe: {len(latencies)} requests, max {max(latencies or [0]):.1f} s"
        def flooders():
            got = {c["name"]: c["bytes_in"] for c in snapshot(instance)["connections"] if c["name"].startswith("f")}
            return got if len(got) == 40 and all(n > len(payload) for n in got.values()) else None
        wait_until(flooders, what="bytes read from every flooder (published within 1 s)")
    finally:
        stop.set()
        sel.close()
        for s in socks:
            s.close()


def test_busy_workers_a_slow_import_and_a_stuck_sender_are_not_taken_for_hangs(gateway, instance):
    """What a hang is not: a worker working through one queue message of several requests (a fast one,
    then 8 pipelined requests of 0.4 s under --hang-timeout 2: the worker was aborted); a worker waiting
    for room on the reply queue behind a stopped sender; an app that takes 3 s to import.  Only the
    stopped sender is aborted."""
    log = tempfile.TemporaryFile()
    gw = gateway("--heartbeat", "0.5", "--hang-timeout", "2", "--max-outbuf", str(8 << 20),
                 app="tests.slow_import_app:handle", stderr=log.fileno())
    wait_until(lambda: len(_roles(instance).get("worker", [])) == 2, timeout=20, what="both workers (3 s imports)")
    log.seek(0)
    assert b"has not started serving after" in log.read()      # said, not acted on
    log.close()
    s = _raw(gw.port)
    reader = FrameReader(1 << 20)
    try:
        s.sendall(encode_wire(Hello(1, "")))
        assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
        # One write: one Chunk in one queue message, a fast call then 8 x 0.4 s of work for one worker,
        # no message between (a first version timed the calls and took the fast one for the pace).
        s.sendall(encode_wire(Call(1, 0, 0, b"fast")) +
                  b"".join(encode_wire(Call(i, 0, 0, b"sleep:0.4|%d" % i)) for i in range(2, 10)))
        answers = _frames(s, reader, 9, timeout=60)
    finally:
        s.close()
    assert [(a.msgid, a.data) for a in answers] == \
        [(1, b"fast")] + [(i, b"sleep:0.4|%d" % i) for i in range(2, 10)], answers
    workers = _roles(instance)["worker"]
    [sender] = _roles(instance)["sender"]
    s = _raw(gw.port)
    reader = FrameReader(1 << 20)
    try:
        s.sendall(encode_wire(Hello(1, "")))
        assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
        os.kill(sender, signal.SIGSTOP)          # 800 KB of answers: the reply queue fills, workers wait for room
        s.sendall(b"".join(encode_wire(Call(i, 0, 0, b"%05d" % i + b"r" * 4000)) for i in range(1, 201)))
        answers = _frames(s, reader, 200, timeout=60)
    finally:
        s.close()
    assert sorted((a.msgid, a.data[:5]) for a in answers) == [(i, b"%05d" % i) for i in range(1, 201)]
    counters = {p["role"]: p["counters"] for p in snapshot(instance)["processes"]}["acceptor"]
    assert counters["hung"] == 1 and counters["lost_in_workers"] == 0
    assert sorted(_roles(instance)["worker"]) == sorted(workers) and not alive(sender)


def test_a_welcome_that_died_with_the_receiver_ends_in_an_error_not_in_silence(gateway, instance):
    """The receiver accepts a HELLO while the reply queue is full (sender stopped), so the WELCOME waits
    in its backlog, and is killed.  Its slot used to say READY at once: the new receiver served the
    connection, which never got a WELCOME.  READY now waits until the WELCOME is on the queue, so the
    new receiver greets nobody and times the handshake out: the client gets an ERROR and the end."""
    gw = gateway("--handshake-timeout", "1", workers=1)
    [sender] = _roles(instance)["sender"]
    [receiver] = _roles(instance)["receiver"]
    filler, late = _raw(gw.port), None
    try:
        filler.sendall(encode_wire(Hello(1, "")))
        assert isinstance(_frames(filler, FrameReader(1 << 20), 1)[0], frame.Welcome)
        os.kill(sender, signal.SIGSTOP)
        # ~600 KB of answers: the reply queue fills and the worker holds the rest, but the receiver's
        # backlog stays under its 1 MiB limit, so it goes on reading (and takes the next HELLO)
        filler.sendall(b"".join(encode_wire(Call(i, 0, 0, b"f" * 4000)) for i in range(1, 151)))
        wait_until(lambda: snapshot(instance)["queues"]["replies"]["messages"]
                   == snapshot(instance)["queues"]["replies"]["capacity"], what="a full reply queue")
        late = _raw(gw.port)
        late.sendall(encode_wire(Hello(1, "late")))
        wait_until(lambda: {p["role"]: p for p in snapshot(instance)["processes"]}["receiver"]["counters"]
                   ["frames_in"] >= 152, what="the receiver to read the HELLO")
        os.kill(receiver, signal.SIGKILL)
        wait_until(lambda: [p for p in _roles(instance).get("receiver", []) if p != receiver],
                   what="a new receiver")
        os.kill(sender, signal.SIGCONT)
        [first, *rest] = _frames_until_end(late, FrameReader(1 << 20))
        assert isinstance(first, frame.Error) and first.code == ErrorCode.HANDSHAKE_TIMEOUT, first
    finally:
        os.kill(sender, signal.SIGCONT)
        filler.close()
        if late is not None:
            late.close()


def test_the_conformance_app_makes_the_gateway_send_every_kind_of_answer(gateway):
    """duprep.apps.conformance (protocol.md 1.14): what a client author drives to see DEFERRED, APP_ERROR,
    a worker PUSH, a reply too large for the queues, a late answer and no answer at all."""
    gw = gateway(app="duprep.apps.conformance:handle")
    with duprep.Client("127.0.0.1", gw.port, timeout=10) as c:
        assert c.request(b"plain") == b"plain"
        with pytest.raises(duprep.RemoteError) as e:
            c.request(b"fail:on purpose")
        assert e.value.code == ErrorCode.APP_ERROR and "RuntimeError: on purpose" in str(e.value)
        with pytest.raises(duprep.Deferred) as d:
            c.request(b"defer:50")
        m = c.receive(timeout=10)
        assert (m.kind, m.msgid, m.data) == ("deferred", d.value.msgid, b"defer:50")
        assert c.request(b"push:hello") == b"push:hello"
        m = c.receive(timeout=10)
        assert (m.kind, m.source, m.data, m.cpid) == ("push", "", b"hello", 0)
        assert c.request(b"size:5000") == b"x" * 5000
        with pytest.raises(duprep.RemoteError) as e:
            c.request(b"size:100000")
        assert e.value.code == ErrorCode.APP_ERROR and "exceeds the largest frame" in str(e.value)
        with pytest.raises(duprep.Timeout) as t:
            c.request(b"sleep:300", timeout=0.05)
        m = c.receive(timeout=10)
        assert (m.kind, m.msgid, m.data) == ("late", t.value.msgid, b"sleep:300")
        with pytest.raises(duprep.Timeout):      # nothing is coming: only a bounded wait can show it
            c.request(b"none", timeout=0.3)
        assert c.request(b"after") == b"after"   # the connection is fine


def test_two_workers_and_a_replier_in_one_process_keep_rows_of_their_own(gateway, instance):
    """Row locks belong to each Worker, not to its process (lock.py: OFD locks). Two Workers in one
    process get two rows; closing one, and opening and closing a Replier, leaves the other's row
    claimed: a worker elsewhere takes another row and does not answer the live worker's request
    with WORKER_LOST, so the client gets the real answer."""
    gw = gateway(workers=0, app="none")
    mine = lambda: sorted(p["row"] for p in snapshot(instance)["processes"]        # noqa: E731
                          if p["role"] == "worker" and p["pid"] == os.getpid())
    with bus.Worker(instance) as w1, duprep.Client("127.0.0.1", gw.port, timeout=20) as c:
        with bus.Worker(instance):
            rows = mine()
            assert len(rows) == 2, "two Workers of one process share a row"
            row = rows[0]                           # w1's: it claimed first
            result: dict[str, object] = {}

            def ask() -> None:
                try:
                    result["reply"] = c.request(b"held")
                except Exception as e:
                    result["reply"] = e
            t = threading.Thread(target=ask)
            t.start()
            held = w1.receive(timeout=10)
        with bus.Replier(instance):                 # e.g. a handler pushing to another client
            pass
        code = ("import os, sys\nfrom duprep import bus\nfrom duprep.status import snapshot\n"
                "with bus.Worker(sys.argv[1]):\n"
                "    print(*[p['row'] for p in snapshot(sys.argv[1])['processes'] if p['pid'] == os.getpid()])\n")
        other = subprocess.run([sys.executable, "-c", code, instance], capture_output=True, text=True, timeout=30,
                               env=dict(os.environ, PYTHONPATH=ROOT))
        assert other.returncode == 0, other.stderr
        assert int(other.stdout) != row and "WORKER_LOST" not in other.stderr, (row, other.stdout, other.stderr)
        w1.reply(held, b"the real answer")
        w1.flush()
        t.join(20)
        assert result["reply"] == b"the real answer"


def test_an_invalid_max_outbuf_is_refused_and_the_minimum_carries_relays(gateway, instance, monkeypatch):
    """--max-outbuf below its minimum used to be taken, and then every relay was silently dropped."""
    for bad in ("-1", "0"):
        out = duprep_cli("serve", "--instance", instance, "--port", "0", "--app", "none", "--max-outbuf", bad)
        assert out.returncode == 4 and "--max-outbuf must be at least 65536 bytes" in out.stderr, out
        assert not ipc_leftovers(instance)
    # The queue message size the kernel gives is known only at boot: the acceptor checks again.
    from duprep import queues
    from duprep.config import GatewayConfig
    from duprep.gateway.acceptor import Acceptor
    plan = queues.plan
    monkeypatch.setattr(queues, "plan", lambda **kw: queues.QueuePlan(depth=2, msgsize=65536))
    acceptor = Acceptor(GatewayConfig(instance=instance, port=0, app=None, sched="other", max_outbuf=65536))
    assert acceptor.run() == 4 and not ipc_leftovers(instance)
    monkeypatch.setattr(queues, "plan", plan)
    gw = gateway("--queue-size", "8192", "--max-outbuf", "65536", workers=0, app="none")      # the minimum
    with duprep.Client("127.0.0.1", gw.port, name="alice", timeout=10) as a, \
            duprep.Client("127.0.0.1", gw.port, name="bob", timeout=10) as b:
        big = os.urandom(7000)                      # near the largest frame of 8 KiB queue messages
        a.relay("bob", big)
        got = b.receive(timeout=10)
        assert (got.source, got.data) == ("alice", big)
