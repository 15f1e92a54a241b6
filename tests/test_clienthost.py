"""The client host: one client daemon carries many local processes over one gateway link.

Real processes throughout: a gateway (``duprep serve``), a client daemon
(``duprep client-daemon``) and local processes (``python -c``) that use
:class:`duprep.local.Client`.  Every wait is for an observable condition
(a line from a child, the daemon's status, a queue that vanished) with a
deadline; every process and IPC object a test makes is ended and removed in
the fixtures, also when the test fails.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import msgspec
import posix_ipc
import pytest

from duprep import bus, ipcnames, queues
from duprep.bus import Request
from duprep.client import Client as DirectClient
from duprep.clienthost.launch import DaemonProcess, start_daemon
from duprep.clienthost import procid
from duprep.clienthost.procid import start_time
from duprep.errors import BrokenResourceError, ClosedResourceError, Deferred, RemoteError, Timeout
from duprep.frame import (
    PROTOCOL_VERSION,
    Call,
    Error,
    ErrorCode,
    Hello,
    Reply,
    Welcome,
    client_decoder,
    encode_wire,
    server_decoder,
)
from duprep.gateway.callback import CallbackRefused, CallMe, check_call, connect_back
from duprep.launch import GatewayProcess, start_gateway
from duprep.local import LINK_LOST, Client
from duprep.status import snapshot
from duprep.wire import FrameReader

from .conftest import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
# Small gateway queues: RLIMIT_MSGQUEUE is one budget for every queue of the user.
APP = ["--app", "tests.test_clienthost:app", "--workers", "2", "--drain-timeout", "0.5", "--queue-depth", "4"]
_ids = itertools.count()


def app(request: Request) -> bytes | None:
    """The gateway's business handler in these tests.

    Echo; ``sleep:<s>`` echoes after a while; ``defer:<dir>`` answers DEFERRED
    and leaves the request in ``<dir>`` for the test to answer later; ``none``
    never answers; ``lost:<dir>`` leaves the request in ``<dir>`` and kills its
    worker (the gateway answers WORKER_LOST, the test may answer after it).
    """
    if request.data == b"none":
        return None
    if request.data.startswith(b"lost:"):
        path = os.path.join(request.data[5:].decode(), "request")
        with open(path + ".tmp", "wb") as f:
            f.write(msgspec.msgpack.encode(request))
        os.rename(path + ".tmp", path)
        os.kill(os.getpid(), signal.SIGKILL)
    if request.data.startswith(b"sleep:"):
        time.sleep(float(request.data[6:]))
    if request.data.startswith(b"defer:"):
        path = os.path.join(request.data[6:].decode(), "request")
        with open(path + ".tmp", "wb") as f:
            f.write(msgspec.msgpack.encode(request))
        os.rename(path + ".tmp", path)
        return bus.DEFERRED
    return request.data


# --- helpers ------------------------------------------------------------------------------------

# duprep does not need /dev/mqueue mounted; where it is, the tests list it, else they probe names.
MQUEUE_LISTABLE = os.path.ismount("/dev/mqueue")


def queue_exists(name: str) -> bool:
    try:
        posix_ipc.MessageQueue(name).close()
        return True
    except posix_ipc.ExistentialError:
        return False


def processes_of(instance: str) -> list[int]:
    """Live processes whose command line names the instance (gateway, workers, daemon, locals)."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if instance.encode() in cmd and state != "Z":
            out.append(int(entry))
    return out


LOCAL_PROGRAM = r"""
import json, os, sys
from duprep.errors import DuprepError
from duprep.local import Client

instance, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = Client(instance, timeout=20)
print(json.dumps({"event": "attached", "pid": os.getpid()}), flush=True)
sys.stdin.readline()                                  # "go"
if mode == "victim":
    c.request(b"sleep:1.0")                           # killed while this is in flight
ok, bad, errors = 0, 0, []
for i in range(n):
    payload = f"{os.getpid()}:{i}:{mode}".encode()
    try:
        reply = c.request(payload)
    except DuprepError as e:
        errors.append(repr(e))
        continue
    ok += reply == payload
    bad += reply != payload
print(json.dumps({"event": "done", "ok": ok, "bad": bad, "errors": errors[:5]}), flush=True)
c.close()
"""


class LocalProc:
    """A local business process (``python -c LOCAL_PROGRAM``) talking line-JSON to the test."""

    def __init__(self, instance: str, n: int, mode: str = "share") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LOCAL_PROGRAM, instance, str(n), mode], env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.start = start_time(self.pid)

    def expect(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"local process {self.pid}: no {event!r} within {timeout} s")
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"local process {self.pid} exited ({self.proc.wait()}) before {event!r}")
                msg = json.loads(line)
                if msg["event"] == event:
                    return msg  # type: ignore[no-any-return]

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Host:
    """Everything one test starts; :meth:`close` ends it all, in order, whatever happened."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.gateways: list[GatewayProcess] = []
        self.daemons: list[DaemonProcess] = []
        self.locals: list[LocalProc] = []
        self.clients: list[Client] = []

    def gateway(self, *args: str) -> GatewayProcess:
        gw = start_gateway(self.instance, args=[*APP, *args], env=ENV)
        self.gateways.append(gw)
        return gw

    def daemon(self, server: str, *args: str) -> DaemonProcess:
        d = start_daemon(self.instance, server, args=args, env=ENV)
        self.daemons.append(d)
        return d

    def local(self, n: int, mode: str = "share") -> LocalProc:
        p = LocalProc(self.instance, n, mode)
        self.locals.append(p)
        return p

    def client(self, **kw: Any) -> Client:
        c = Client(self.instance, **kw)
        self.clients.append(c)
        return c

    def reply_queues(self) -> list[str]:
        """The reply queues of this host's local processes (and of this test process) that exist."""
        prefix = ipcnames.clienthost_reply_prefix(self.instance)
        if MQUEUE_LISTABLE:
            return sorted("/" + n for n in os.listdir("/dev/mqueue") if ("/" + n).startswith(prefix))
        owners = [(p.pid, p.start, 4) for p in self.locals] + [(os.getpid(), start_time(os.getpid()), 64)]
        names = (ipcnames.clienthost_reply_queue(self.instance, pid, start, n)
                 for pid, start, most in owners for n in range(1, most + 1))
        return sorted(n for n in names if queue_exists(n))

    def leftovers(self) -> list[str]:
        """Every queue and /dev/shm file of the instance (gateway or client host) that still exists."""
        names = ipcnames.all_names(self.instance)
        ch = ipcnames.clienthost_all_names(self.instance)
        found = [q for q in (names["requests"], names["replies"], ch["uplink"]) if queue_exists(q)]
        found += self.reply_queues()
        marks = (f"duprep.{self.instance}.", f"duprep-ch.{self.instance}.")
        found += [f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(marks)]
        return sorted(set(found))

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for p in self.locals:
            p.kill()
        for d in self.daemons:
            d.stop(timeout=10)
        for gw in self.gateways:
            gw.stop(timeout=20)


@pytest.fixture
def host() -> Iterator[Host]:
    """A unique instance; afterwards no process and no IPC object of it may remain."""
    h = Host(f"ch{os.getpid()}-{next(_ids)}")
    try:
        yield h
    finally:
        h.close()
        procs = processes_of(h.instance)
        for pid in procs:
            os.kill(pid, signal.SIGKILL)
        left = h.leftovers()
        for name in left:
            if name.startswith("/dev/shm/"):
                os.unlink(name)
            else:
                queues.unlink(name)
        assert not procs, f"processes left behind: {procs}"
        assert not left, f"IPC objects left behind: {left}"


def start_locals(h: Host, count: int, n: int, modes: dict[int, str] | None = None) -> list[LocalProc]:
    procs = [h.local(n, (modes or {}).get(i, "share")) for i in range(count)]
    for p in procs:
        p.expect("attached")
    return procs


# --- the scenarios ----------------------------------------------------------------------

def test_twenty_processes_share_one_connection(host: Host) -> None:
    gw = host.gateway()
    name = f"host-{host.instance}"
    d = host.daemon(f"127.0.0.1:{gw.port}", "--name", name)
    d.wait_link("up")
    procs = start_locals(host, 20, 100)

    snap = d.status()
    assert sorted(p["pid"] for p in snap["processes"]) == sorted(p.pid for p in procs)
    assert len(host.reply_queues()) == 20
    conns = snapshot(host.instance)["connections"]
    assert [(c["name"], c["state"]) for c in conns] == [(name, "open")]

    for p in procs:
        p.go()
    results = [p.expect("done") for p in procs]
    assert [(r["ok"], r["bad"], r["errors"]) for r in results] == [(100, 0, [])] * 20

    assert len(snapshot(host.instance)["connections"]) == 1
    assert d.status()["link"]["frames_out"] >= 2001             # HELLO + every request, on one link
    for p in procs:
        assert p.proc.wait(timeout=20) == 0
    wait_until(lambda: not d.status()["processes"] and not host.reply_queues(),
               what="every local process detached and its queue removed")
    c = d.status()["counters"]
    assert c["requests"] == 2000 and c["replies"] >= 2000
    assert c["orphan_replies"] == 0 and c["failed_link_lost"] == 0 and c["unmatched"] == 0

    out = subprocess.run([sys.executable, "-m", "duprep", "client-status", "--instance", host.instance],
                         capture_output=True, text=True, env=ENV, timeout=20)
    assert out.returncode == 0 and "client daemon" in out.stdout and name in out.stdout


def test_kill9_local_process_orphans_are_discarded(host: Host) -> None:
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}")
    d.wait_link("up")
    procs = start_locals(host, 20, 100, modes={0: "victim"})
    victim, others = procs[0], procs[1:]
    victim_queues = [q for q in host.reply_queues() if f".p{victim.pid}." in q]
    assert len(victim_queues) == 1

    def victim_waiting() -> bool:
        for p in d.status()["processes"]:
            if p["pid"] == victim.pid:
                return p["endpoints"][0]["in_flight"] == 1
        return False

    victim.go()
    wait_until(victim_waiting, what="the victim's request in flight")
    for p in others:
        p.go()
    victim.kill()                                        # SIGKILL with the request in flight

    wait_until(lambda: victim_queues[0] not in host.reply_queues(), timeout=5,
               what="the victim's reply queue to disappear")
    results = [p.expect("done") for p in others]
    assert [(r["ok"], r["bad"], r["errors"]) for r in results] == [(100, 0, [])] * 19
    snap = wait_until(lambda: (s := d.status())["counters"]["orphan_replies"] >= 1 and s,
                      what="the victim's reply to be discarded and counted")
    c = snap["counters"]
    assert c["processes_exited"] >= 1 and c["orphaned_requests"] == 1 and c["orphan_replies"] == 1
    assert victim.pid not in [p["pid"] for p in snap["processes"]]
    for p in others:
        assert p.proc.wait(timeout=20) == 0


def test_gateway_restart_fails_fast_and_reconnects(host: Host) -> None:
    gw = host.gateway()
    port = gw.port
    d = host.daemon(f"127.0.0.1:{port}", "--max-backoff", "0.5")
    d.wait_link("up")
    c = host.client()
    assert c.request(b"before") == b"before"

    outcomes: list[tuple[str, float]] = []

    def slow_request() -> None:
        t0 = time.monotonic()
        try:
            c.request(b"sleep:3", timeout=20)
            outcomes.append(("replied", time.monotonic() - t0))
        except BrokenResourceError as e:
            outcomes.append((str(e), time.monotonic()))

    threads = [threading.Thread(target=slow_request) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: d.status()["in_flight"] == 3, what="three requests waiting on the link")
    stopped_at = time.monotonic()
    stopper = threading.Thread(target=gw.stop)
    stopper.start()
    for t in threads:
        t.join(timeout=20)
    assert len(outcomes) == 3
    for text, failed_at in outcomes:
        assert "lost the link to gateway" in text, text
        assert failed_at - stopped_at < 5.0, "waiting requests must fail long before their 20 s timeout"

    t0 = time.monotonic()
    with pytest.raises(BrokenResourceError, match="is down"):
        c.request(b"while down")
    assert time.monotonic() - t0 < 1.0
    stopper.join(timeout=30)

    host.gateway("--port", str(port))                   # the same address, as after a real restart
    snap = d.wait_link("up", timeout=15)
    assert snap["link"]["connects"] == 2 and snap["link"]["losses"] == 1
    assert c.request(b"after") == b"after"               # the same Client: no restart needed
    assert len(snapshot(host.instance)["connections"]) == 1


# --- beyond the list --------------------------------------------------------------------

def test_daemon_crash_is_cleaned_up_and_clients_reattach(host: Host) -> None:
    gw = host.gateway()
    d1 = host.daemon(f"127.0.0.1:{gw.port}")
    d1.wait_link("up")
    c = host.client()
    assert c.request(b"one") == b"one"
    doomed = start_locals(host, 1, 1)[0]
    doomed_queue = [q for q in host.reply_queues() if f".p{doomed.pid}." in q]
    d1.kill()                                            # a crash: nothing is cleaned up
    doomed.kill()                                        # dies while no daemon watches it
    assert doomed_queue[0] in host.reply_queues()
    assert os.path.exists(ipcnames.clienthost_lock_path(host.instance))

    with pytest.raises(BrokenResourceError):
        c.request(b"two", timeout=5)                    # no daemon: fails at once, no timeout
    d2 = host.daemon(f"127.0.0.1:{gw.port}")
    d2.wait_link("up")
    assert doomed_queue[0] not in host.reply_queues()   # the dead one's queue is gone
    assert c.request(b"three") == b"three"               # the live one attached again by itself
    assert len(d2.status()["processes"]) == 1


def test_no_daemon_is_a_clear_error(host: Host) -> None:
    t0 = time.monotonic()
    with pytest.raises(BrokenResourceError, match="no client daemon is running"):
        Client(host.instance)
    assert time.monotonic() - t0 < 1.0
    out = subprocess.run([sys.executable, "-m", "duprep", "client-status", "--instance", host.instance, "--json"],
                         capture_output=True, text=True, env=ENV, timeout=20)
    assert out.returncode == 3 and json.loads(out.stdout)["state"] == "stopped"


def test_pushes_and_relays_reach_the_right_process(host: Host) -> None:
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}", "--name", "hostname1")
    d.wait_link("up")
    taker = host.client(pushes=True)
    other = host.client()
    with DirectClient("127.0.0.1", gw.port, name="sender1", timeout=10) as direct:
        direct.relay("hostname1", b"to the host")
    msg = taker.receive(timeout=10)
    assert (msg.kind, msg.source, msg.data) == ("relay", "sender1", b"to the host")
    with pytest.raises(Timeout):
        other.receive(timeout=0.2)
    assert d.status()["counters"]["pushes"] == 1


def test_a_push_for_a_dead_process_reaches_nobody_else(host: Host) -> None:
    """A worker pushes to the cpid of a local process that has died: the push is dropped and counted,
    never handed to another process (not even one that takes pushes for the host)."""
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}", "--name", "hostname3")
    d.wait_link("up")
    [victim] = start_locals(host, 1, 0)
    dead_cpid = procid.cpid(victim.pid, start_time(victim.pid))
    victim.kill()
    wait_until(lambda: victim.pid not in [p["pid"] for p in d.status()["processes"]],
               what="the daemon to notice the death")
    taker = host.client(pushes=True)
    with bus.Replier(host.instance) as replier:
        replier.push("hostname3", b"for the dead one", cpid=dead_cpid)
        replier.push("hostname3", b"for the host")
    msg = taker.receive(timeout=10)
    assert (msg.kind, msg.data) == ("push", b"for the host")      # the first one went nowhere
    assert d.status()["counters"]["pushes_unrouted"] == 1


def test_bad_attaches_are_refused_and_the_daemon_serves_on(host: Host) -> None:
    """Attach messages no real process sends (pid 0, a pid beyond pid_max, a reply queue of 1-byte
    messages) are refused and counted; the daemon stays up for everyone, and its next start is not
    blocked by the queues they left."""
    from duprep.clienthost.instance import read_info
    from duprep.clienthost.protocol import LOCAL_VERSION, Attach, encode
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}")
    d.wait_link("up")
    good = host.client()
    assert good.request(b"before") == b"before"
    info = read_info(host.instance)
    me, start = os.getpid(), start_time(os.getpid())
    made = []
    try:
        for pid, st, n, size in ((0, 0, 1, 256), (2**40, 5, 1, 256), (me, start, 77, 1)):
            name = ipcnames.clienthost_reply_queue(host.instance, pid, st, n)
            made.append(posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=2, max_message_size=size))
            up = posix_ipc.MessageQueue(info.uplink)
            up.send(encode(Attach(LOCAL_VERSION, pid, st, n)))
            up.close()
        wait_until(lambda: d.status()["counters"]["refused"] == 3, what="three refusals")
        assert good.request(b"after") == b"after"
    finally:
        for q in made:
            q.close()
            try:
                q.unlink()
            except posix_ipc.ExistentialError:
                pass


def test_a_process_that_execs_without_closing_can_attach_again(host: Host) -> None:
    """exec() keeps the pid and start time, and the new program numbers its reply queues from 1
    again: its Client must take the next free name instead of failing on the old program's queue."""
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}")
    d.wait_link("up")
    stage2 = ("import sys; from duprep.local import Client; "
              "print(Client(sys.argv[1], timeout=10).request(b'after exec').decode(), flush=True)")
    stage1 = ("import os, sys; from duprep.local import Client; c = Client(sys.argv[1], timeout=10); "
              "print(c.request(b'before exec').decode(), flush=True); "
              "os.execv(sys.executable, [sys.executable, '-c', sys.argv[2], sys.argv[1]])")
    out = subprocess.run([sys.executable, "-c", stage1, host.instance, stage2], env=ENV, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.split() == ["before", "exec", "after", "exec"], out.stderr[-2000:]
    wait_until(lambda: not host.reply_queues(), what="the daemon to drop both programs' queues")


def test_late_deferred_and_addressed_push_as_with_a_direct_client(host: Host, tmp_path: Any) -> None:
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}", "--name", "hostname2")
    d.wait_link("up")
    c = host.client()
    with pytest.raises(Timeout) as late:
        c.request(b"sleep:0.5", timeout=0.05)
    msg = c.receive(timeout=10)
    assert (msg.kind, msg.msgid, msg.data) == ("late", late.value.msgid, b"sleep:0.5")

    with pytest.raises(Deferred) as deferred:
        c.request(f"defer:{tmp_path}".encode(), timeout=10)
    with open(tmp_path / "request", "rb") as f:
        request = msgspec.msgpack.decode(f.read(), type=Request)
    assert request.cpid == procid.cpid(os.getpid(), start_time(os.getpid())) and request.client == "hostname2"
    with bus.Replier(host.instance) as replier:
        replier.push("hostname2", b"just for you", cpid=request.cpid)   # addressed to this pid
        replier.reply(request, b"answer after all")
    msg = c.receive(timeout=10)
    assert (msg.kind, msg.data, msg.cpid) == ("push", b"just for you", os.getpid())
    msg = c.receive(timeout=10)
    assert (msg.kind, msg.msgid, msg.data) == ("deferred", deferred.value.msgid, b"answer after all")
    assert d.status()["in_flight"] == 0


def test_large_replies_come_in_pieces_and_oversized_requests_spare_the_link(host: Host) -> None:
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}")
    d.wait_link("up")
    c = host.client()
    big = bytes(range(256)) * 28                       # 7168 bytes: seven reply-queue messages
    assert c.request(big) == big
    with pytest.raises(RemoteError, match="FRAME_TOO_LARGE") as e:
        c.request(b"x" * (c.max_frame + 1))
    assert e.value.code == ErrorCode.FRAME_TOO_LARGE
    assert c.request(b"still up") == b"still up"       # the shared link survived it
    assert d.status()["link"]["connects"] == 1


def test_callback_links_with_safety_checks(host: Host) -> None:
    """The daemon side of --links callback against a stand-in gateway built on gateway/callback.py."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, Any] = {}

    def fake_gateway() -> None:
        l0, _ = listener.accept()
        with l0:
            reader = FrameReader(1 << 20)
            bodies: list[memoryview] = []
            while not bodies:
                bodies = reader.feed(l0.recv(65536))
            call = msgspec.msgpack.decode(bodies[0], type=CallMe)
            seen["call"] = call
            # Someone who does not know the nonce tries the daemon's port first: refused.
            with socket.create_connection(("127.0.0.1", call.up_port)) as intruder:
                intruder.sendall(b"x" * 16)
                intruder.settimeout(5)
                seen["intruder_eof"] = intruder.recv(1) == b""
            l1, l2 = connect_back(l0, call, timeout=5)
        with l1, l2:
            l1.setblocking(True)
            reader, decode = FrameReader(1 << 20), client_decoder().decode
            while True:
                data = l1.recv(65536)
                if not data:
                    return
                for body in reader.feed(data):
                    frame = decode(body)
                    if isinstance(frame, Hello):
                        seen["hello"] = frame
                        l2.sendall(encode_wire(Welcome(PROTOCOL_VERSION, 7, 1, frame.name, 8000)))
                    elif isinstance(frame, Call):
                        l2.sendall(encode_wire(Reply(frame.msgid, frame.cpid, frame.data)))

    t = threading.Thread(target=fake_gateway, daemon=True)
    t.start()
    try:
        d = host.daemon(f"127.0.0.1:{port}", "--links", "callback", "--name", "cb")
        snap = d.wait_link("up")
        assert snap["link"]["sid"] == 7 and seen["intruder_eof"]
        assert seen["hello"].name == "cb"
        c = host.client()
        assert [c.request(b"r%d" % i) for i in range(50)] == [b"r%d" % i for i in range(50)]
        d.stop()
        t.join(timeout=10)
        assert not t.is_alive()
    finally:
        listener.close()
    call = seen["call"]
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as l0:
        with pytest.raises(CallbackRefused, match="differ"):
            check_call(l0, CallMe(PROTOCOL_VERSION, call.up_port, call.up_port, call.nonce))
    with pytest.raises(msgspec.ValidationError):                # privileged ports are never called
        msgspec.msgpack.decode(msgspec.msgpack.encode(CallMe(1, 22, 2000, b"n" * 16)), type=CallMe)


def test_callback_links_end_to_end_with_the_real_gateway(host: Host) -> None:
    gw = host.gateway("--links", "callback")
    d = host.daemon(f"127.0.0.1:{gw.port}", "--links", "callback", "--name", "cb-host")
    d.wait_link("up")
    c = host.client()
    assert [c.request(b"cb%d" % i) for i in range(100)] == [b"cb%d" % i for i in range(100)]
    with DirectClient("127.0.0.1", gw.port, name="direct") as direct:   # direct clients still work beside it
        assert direct.request(b"plain") == b"plain"
        conns = snapshot(host.instance)["connections"]
        assert sorted(x["name"] for x in conns) == ["cb-host", "direct"]    # L1 + L2 count as one client
    d.stop(timeout=10)
    wait_until(lambda: not snapshot(host.instance)["connections"], what="the callback links to be released")


def test_callback_goes_only_to_the_l0_peer_address(host: Host) -> None:
    """CALLME carries ports, never an address: the gateway dials the address L0 came from."""
    gw = host.gateway("--links", "callback", "--handshake-timeout", "3")
    decoys = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]     # listening on the WRONG address
    try:
        up, down = (s.getsockname()[1] for s in decoys)
        l0 = socket.create_connection(("127.0.0.1", gw.port), timeout=10, source_address=("127.0.0.2", 0))
        with l0:
            l0.sendall(encode_wire(CallMe(PROTOCOL_VERSION, up, down, b"n" * 16)))
            reader, data = FrameReader(1 << 20), b""
            bodies: list[memoryview] = []
            while not bodies:
                data = l0.recv(65536)
                assert data, "closed without an answer"
                bodies = reader.feed(data)
            err = server_decoder().decode(bodies[0])
            assert isinstance(err, Error) and err.code == ErrorCode.BAD_HELLO
            assert "127.0.0.2" in err.message or "refused" in err.message.lower() or "ECONN" in err.message
        for s in decoys:                       # nothing ever connected to 127.0.0.1's ports
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.accept()
        wait_until(lambda: not snapshot(host.instance)["connections"], what="the refused slot to be freed")
    finally:
        for s in decoys:
            s.close()


def test_callme_to_a_direct_gateway_is_refused_clearly(host: Host) -> None:
    gw = host.gateway()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as l0:
        l0.sendall(encode_wire(CallMe(PROTOCOL_VERSION, 40000, 40001, b"n" * 16)))
        reader, bodies = FrameReader(1 << 20), []
        while not bodies:
            data = l0.recv(65536)
            assert data
            bodies = reader.feed(data)
        err = server_decoder().decode(bodies[0])
        assert err.code == ErrorCode.BAD_HELLO and "--links callback" in err.message


# --- review fixes: receive after the daemon, close racing an attach, unanswered requests, cleanup -----

def closed_port() -> socket.socket:
    """A bound TCP socket that does not listen: connecting to its port is refused (a link that stays down).
    The caller closes it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def test_receive_hands_out_what_came_before_the_daemon_exited(host: Host) -> None:
    """A late reply and a relay that arrived, and the LINK_LOST error for an answer that cannot come any
    more, are handed out by receive() after the daemon has gone; only then does it raise, once, and the
    next call says that no daemon runs (as duprep.Client's receive() does after a connection loss)."""
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}", "--name", "hostname4")
    d.wait_link("up")
    c = host.client(pushes=True)
    with pytest.raises(Timeout) as late:
        c.request(b"sleep:0.3", timeout=0.05)
    with pytest.raises(Timeout) as unanswered:
        c.request(b"none", timeout=0.05)
    with DirectClient("127.0.0.1", gw.port, name="sender4", timeout=10) as direct:
        direct.relay("hostname4", b"to the host")
    wait_until(lambda: (n := d.status()["counters"])["replies"] >= 1 and n["pushes"] >= 1,
               what="the late reply and the relay on the reply queue")
    d.stop()

    got = []
    with pytest.raises(BrokenResourceError, match="exited"):
        for _ in range(10):
            got.append(c.receive(timeout=10))
    assert sorted((m.kind, m.msgid, m.code) for m in got) == sorted([
        ("late", late.value.msgid, 0), ("relay", 0, 0), ("error", unanswered.value.msgid, LINK_LOST)])
    with pytest.raises(BrokenResourceError, match="no client daemon is running"):
        c.receive(timeout=10)


def _close_while_it_waits(c: Client, daemon_pid: int, uplink: posix_ipc.MessageQueue, messages: int,
                          call: Callable[[], object]) -> BaseException:
    """Stop the daemon, run ``call`` in a thread until ``messages`` wait on the uplink, close ``c``: the
    call must end at once; what it raised."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:      # noqa: BLE001 - the test checks which
            outcome.append(e)

    os.kill(daemon_pid, signal.SIGSTOP)
    t = threading.Thread(target=run)
    try:
        t.start()
        wait_until(lambda: uplink.current_messages == messages, what=f"{messages} message(s) on the uplink")
        t0 = time.monotonic()
        c.close()
        t.join(timeout=10)
        assert time.monotonic() - t0 < 5 and not t.is_alive(), "the call still waits after close()"
    finally:
        os.kill(daemon_pid, signal.SIGCONT)
        uplink.close()
    assert len(outcome) == 1, outcome
    return outcome[0]


def test_close_ends_a_send_waiting_for_room_on_the_uplink(host: Host) -> None:
    """With timeout=None a send() waiting for room on a full uplink (a stalled daemon) waited for ever,
    close() notwithstanding, on descriptors close() had closed: now it raises ClosedResourceError."""
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}", "--uplink-depth", "2")
    d.wait_link("up")
    c = host.client(timeout=None)

    def flood() -> None:
        while True:
            c.send(b"x" * 100)
    uplink = posix_ipc.MessageQueue(ipcnames.clienthost_uplink(host.instance))
    assert isinstance(_close_while_it_waits(c, d.pid, uplink, 2, flood), ClosedResourceError)


def test_close_during_a_reattach_leaves_nothing(host: Host) -> None:
    """close() while another thread re-attaches to a slow daemon (it does not answer the Attach yet):
    that call raises ClosedResourceError at once, and no reply queue, reader thread or daemon endpoint
    of the Client is left."""
    gw = host.gateway()
    d1 = host.daemon(f"127.0.0.1:{gw.port}")
    d1.wait_link("up")
    c = host.client(timeout=10, attach_timeout=60)
    assert c.request(b"one") == b"one"
    d1.stop()
    d2 = host.daemon(f"127.0.0.1:{gw.port}")
    uplink = posix_ipc.MessageQueue(ipcnames.clienthost_uplink(host.instance))
    assert isinstance(_close_while_it_waits(c, d2.pid, uplink, 1, lambda: c.request(b"two")), ClosedResourceError)
    assert not host.reply_queues()
    assert not [x for x in threading.enumerate() if x.name.startswith("duprep-local")]
    snap = wait_until(lambda: (s := d2.status())["counters"]["refused"] == 1 and s,
                      what="the daemon to refuse the Attach of a queue that is gone")
    assert snap["processes"] == []
    with pytest.raises(ClosedResourceError):
        c.request(b"three")


def test_unanswered_requests_are_forgotten_in_the_daemon_and_the_client(host: Host, monkeypatch: Any) -> None:
    """A handler that returns None never answers: the daemon forgets the route late_grace after the
    request's timeout (counted as expired), and the Client remembers at most REMEMBER late msgids."""
    import duprep.client
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}", "--late-grace", "0.2")
    d.wait_link("up")
    c = host.client()
    monkeypatch.setattr(duprep.client, "REMEMBER", 5)
    msgids = []
    for _ in range(20):
        with pytest.raises(Timeout) as e:
            c.request(b"none", timeout=0.05)
        msgids.append(e.value.msgid)
    assert list(c._late) == msgids[-5:]                  # the oldest forgotten first
    snap = wait_until(lambda: (s := d.status())["in_flight"] == 0 and s, what="the routes to expire")
    assert snap["counters"]["expired"] == 20 and snap["counters"]["unmatched"] == 0
    assert c.request(b"still works", timeout=10) == b"still works"


def test_overdue_requests_do_not_hold_up_the_stop(host: Host) -> None:
    """Routes whose requester has given up (kept for the grace, in case a late answer comes) do not make a
    SIGTERM wait drain_timeout (5 s) for answers nobody waits for."""
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}")
    d.wait_link("up")
    c = host.client()
    for _ in range(3):
        with pytest.raises(Timeout):
            c.request(b"none", timeout=0.05)
    wait_until(lambda: (s := d.status())["overdue"] == 3 and s["in_flight"] == 3, what="three overdue routes")
    t0 = time.monotonic()
    assert d.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 3.0


def test_requests_without_a_deadline_are_bounded(host: Host) -> None:
    """timeout 0 tells the worker "no deadline": such routes never expire, so at most --max-routes are
    kept; the oldest is forgotten, counted, and its requester told through receive()."""
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}", "--max-routes", "5")
    d.wait_link("up")
    c = host.client()
    msgids = []
    for _ in range(8):
        with pytest.raises(Timeout) as e:
            c.request(b"none", timeout=0)
        msgids.append(e.value.msgid)
    snap = wait_until(lambda: (s := d.status())["counters"]["forgotten"] == 3 and s, what="three routes forgotten")
    assert snap["in_flight"] == 5
    told = [c.receive(timeout=10) for _ in range(3)]
    assert [(m.kind, m.msgid, m.code) for m in told] == [("error", i, LINK_LOST) for i in msgids[:3]]
    assert b"forgot" in told[0].data
    assert c.request(b"ok", timeout=10) == b"ok"


def test_a_reply_after_worker_lost_is_handed_out_as_late(host: Host, tmp_path: Any) -> None:
    """protocol.md 1.6: WORKER_LOST first, then the REPLY from the process the request was passed to;
    as with duprep.Client, receive() hands that REPLY out as "late" instead of the daemon dropping it."""
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}")
    d.wait_link("up")
    c = host.client()
    with pytest.raises(RemoteError) as lost:
        c.request(f"lost:{tmp_path}".encode(), timeout=20)
    assert lost.value.code == ErrorCode.WORKER_LOST
    with open(tmp_path / "request", "rb") as f:
        request = msgspec.msgpack.decode(f.read(), type=Request)
    with bus.Replier(host.instance) as replier:
        replier.reply(request, b"answered after all")
    msg = c.receive(timeout=10)
    assert (msg.kind, msg.msgid, msg.data) == ("late", lost.value.msgid, b"answered after all")
    assert d.status()["counters"]["unmatched"] == 0


def test_timeout_none_means_no_deadline(host: Host) -> None:
    gw = host.gateway()
    d = host.daemon(f"127.0.0.1:{gw.port}", "--name", "hostname5")
    d.wait_link("up")
    c = host.client(timeout=None)
    assert c.request(b"sleep:0.1") == b"sleep:0.1"
    c.send(b"one-way")
    c.relay("hostname5", b"to myself")
    assert c.request(b"x", timeout=5) == b"x"
    with pytest.raises(ValueError, match="timeout"):
        Client(host.instance, timeout=-1)


def test_client_cleanup_after_kill9(host: Host) -> None:
    """After kill -9 of the daemon, client-status says it crashed and names client-cleanup, which removes
    everything the daemon and its dead local processes left, keeps the queue of a live local process,
    and refuses while a daemon runs."""
    down = closed_port()
    try:
        server = f"127.0.0.1:{down.getsockname()[1]}"
        d = host.daemon(server)
        refused = duprep_cli("client-cleanup", "--instance", host.instance)
        assert refused.returncode == 1 and "already running" in refused.stderr
        assert queue_exists(ipcnames.clienthost_uplink(host.instance))     # nothing removed under it
        live = host.client()
        [dead] = start_locals(host, 1, 0)
        [live_queue] = [q for q in host.reply_queues() if f".p{os.getpid()}." in q]
        [dead_queue] = [q for q in host.reply_queues() if f".p{dead.pid}." in q]
        d.kill()
        dead.kill()

        st = duprep_cli("client-status", "--instance", host.instance)
        assert st.returncode == 3 and "crashed" in st.stderr and "client-cleanup" in st.stderr, st.stderr
        st = duprep_cli("client-status", "--instance", host.instance, "--json")
        assert st.returncode == 3 and json.loads(st.stdout)["state"] == "crashed"

        out = duprep_cli("client-cleanup", "--instance", host.instance)
        assert out.returncode == 0, out.stderr
        names = ipcnames.clienthost_all_names(host.instance)
        for name in (names["uplink"], names["info"], names["lock"], dead_queue):
            assert name in out.stdout
        assert live_queue in out.stdout.split("kept", 1)[1]
        assert host.reply_queues() == [live_queue]                        # not removed under its owner
        with pytest.raises(BrokenResourceError):
            live.request(b"x", timeout=5)
        live.close()
        out = duprep_cli("client-cleanup", "--instance", host.instance)
        assert out.returncode == 0 and names["registry"] in out.stdout
        assert host.leftovers() == []
        st = duprep_cli("client-status", "--instance", host.instance, "--json")
        assert st.returncode == 3 and json.loads(st.stdout)["state"] == "stopped"
    finally:
        down.close()


def duprep_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "duprep", *args], capture_output=True, text=True, env=ENV,
                          timeout=30)
