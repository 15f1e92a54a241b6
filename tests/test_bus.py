"""The business-side API (duprep.bus) against a real gateway: what a worker owes each request it takes.

Every request a worker takes gets exactly one answer or, if the worker goes away first, ERROR
WORKER_LOST from whoever takes its row -- never none, never both.  And nothing a worker sends can
break a client's connection: what is not a valid answer is refused in the worker.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import duprep
from duprep import bus, frame
from duprep.frame import Call, ErrorCode, Hello, encode_wire
from duprep.status import snapshot
from duprep.wire import FrameReader

from .conftest import ROOT, alive, descendants, wait_until
from .conftest import read_frames as _frames, worker_rows as _worker_rows

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


class _External:
    """A worker in a process of its own (so that it can be killed), ended by the test:
    ``_External("-c", script, instance)``, or a command such as ``"-m", "duprep", "worker", ...``."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, *args], env=ENV)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def _answered_worker_lost(c: duprep.Client, data: bytes) -> None:
    with pytest.raises(duprep.RemoteError) as info:
        c.request(data)
    assert info.value.code == ErrorCode.WORKER_LOST


def _next_owner_of_the_row(instance: str) -> subprocess.CompletedProcess[str]:
    """A worker that attaches (taking the free row: the dead one's, answering what it held) and leaves."""
    return subprocess.run([sys.executable, "-c", "import sys; from duprep import bus; bus.Worker(sys.argv[1]).close()",
                           instance], env=ENV, capture_output=True, text=True, timeout=30)


def test_what_a_worker_sends_is_checked_before_it_can_reach_a_client(gateway, instance):
    gw = gateway("--app", "none", workers=0)
    with bus.Worker(instance) as worker, duprep.Client("127.0.0.1", gw.port, name="c") as c:
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(c.request(b"q", timeout=20)))
        t.start()
        request = worker.receive(timeout=20)
        with pytest.raises(TypeError):
            worker.reply(request, "a str")                        # type: ignore[arg-type]
        with pytest.raises(ValueError):
            worker.fail(request, "x", code=2**40)
        with pytest.raises(TypeError):
            worker.fail(request, 42)                              # type: ignore[arg-type]
        with pytest.raises(ValueError):
            worker.push("c", b"x", cpid=-1)
        with pytest.raises(TypeError):
            worker.push("c", "x")                                 # type: ignore[arg-type]
        worker.reply(request, bytearray(b"bytes-like is fine"))
        t.join(20)
        assert got == [b"bytes-like is fine"]


def test_no_push_to_a_connection_before_its_welcome(gateway, instance):
    """WELCOME is a connection's first frame: a push by sid waits for the handshake (UnknownTarget)."""
    gw = gateway("--app", "none", workers=0)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    try:
        [conn] = wait_until(lambda: snapshot(instance)["connections"], what="the connection in the table")
        assert not conn["ready"]
        with bus.Replier(instance) as r:
            with pytest.raises(duprep.UnknownTarget):
                r.push(conn["sid"], b"too early")
            s.sendall(encode_wire(Hello(1, "")))
            reader = FrameReader(1 << 20)
            assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
            wait_until(lambda: snapshot(instance)["connections"][0]["ready"], what="READY in the table")
            r.push(conn["sid"], b"now")
        assert _frames(s, reader, 1)[0].data == b"now"
    finally:
        s.close()


_PUSH_THEN_HANG = """
import sys, time
from duprep import bus
w = bus.Worker(sys.argv[1])
def handle(req):
    if req.data == b"notify":
        w.push("watcher", b"started")
        time.sleep(600)
    return req.data
bus.run_handler(w, handle)
"""


def test_a_request_whose_handler_pushed_is_still_answered_for_when_its_worker_dies(gateway, instance):
    """A push from inside the handler sends the worker's replies early; it must not also count the
    request in the handler as answered (its copy in the row would be dropped, and nobody would
    answer it when the worker dies)."""
    gw = gateway("--app", "none", workers=0)
    ext = _External("-c", _PUSH_THEN_HANG, instance)
    try:
        with duprep.Client("127.0.0.1", gw.port, name="watcher") as watcher, \
                duprep.Client("127.0.0.1", gw.port, timeout=60) as c:
            assert c.request(b"ping") == b"ping"
            outcome: list[BaseException] = []

            def ask() -> None:
                try:
                    c.request(b"notify")
                except BaseException as e:  # noqa: BLE001 - the test looks at it
                    outcome.append(e)
            t = threading.Thread(target=ask)
            t.start()
            assert watcher.receive(timeout=20).data == b"started"
            ext.kill()
            assert _next_owner_of_the_row(instance).returncode == 0
            t.join(30)
            [e] = outcome
            assert isinstance(e, duprep.RemoteError) and e.code == ErrorCode.WORKER_LOST
    finally:
        ext.kill()


_ANSWER_THEN_DIE = """
import os, signal, sys
from duprep import bus
w = bus.Worker(sys.argv[1])
r = w.receive()
w.reply(r, b"answered")                   # the last of its message: on the reply queue at once
os.kill(os.getpid(), signal.SIGKILL)      # before its next receive()
"""

_SERVE_ONE = """
import sys
from duprep import bus
with bus.Worker(sys.argv[1]) as w:
    r = w.receive()
    w.reply(r, r.data)
"""


def test_a_request_answered_before_its_worker_died_is_not_answered_again(gateway, instance):
    gw = gateway("--app", "none", workers=0)
    dying = _External("-c", _ANSWER_THEN_DIE, instance)
    nxt = None
    try:
        with duprep.Client("127.0.0.1", gw.port, timeout=30) as c:
            assert c.request(b"x") == b"answered"
            dying.proc.wait(30)
            nxt = _External("-c", _SERVE_ONE, instance)          # takes the dead worker's row first
            assert c.request(b"after") == b"after"         # (anything it sent for the row came before)
            with pytest.raises(duprep.Timeout):
                c.receive(timeout=0)                       # no second answer (WORKER_LOST) for "x"
            assert nxt.proc.wait(30) == 0
    finally:
        dying.kill()
        if nxt is not None:
            nxt.kill()


def test_a_worker_closed_holding_requests_answers_them_worker_lost(gateway, instance):
    """One queue message of four requests; the worker answers the first and closes: the three others
    get ERROR WORKER_LOST at once, not a client timeout (and the instance's counts stay right)."""
    gw = gateway("--app", "none", workers=0)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    reader = FrameReader(1 << 20)
    try:
        with bus.Worker(instance) as worker:
            s.sendall(encode_wire(Hello(1, "")) + b"".join(encode_wire(Call(i, 5, 0, b"%d" % i)) for i in range(1, 5)))
            assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
            first = worker.receive(timeout=20)
            assert worker.statistics().held == 3, "the test needs the four in one queue message"
            worker.reply(first, b"one")
        answers = _frames(s, reader, 4)
        assert [(type(f).__name__, f.msgid, getattr(f, "code", 0)) for f in answers] == \
            [("Reply", 1, 0)] + [("Error", i, ErrorCode.WORKER_LOST) for i in (2, 3, 4)]
        [receiver] = [p for p in snapshot(instance)["processes"] if p["role"] == "receiver"]
        assert receiver["counters"]["requests"] == 4
        assert sum(w["counters"]["requests"] for w in _worker_rows(instance)) == 4
    finally:
        s.close()


_EXIT_IN_HANDLER = """
import sys
from duprep import bus
def handle(req):
    if req.data == b"exit":
        sys.exit(0)
    return req.data
with bus.Worker(sys.argv[1]) as w:
    bus.run_handler(w, handle)
"""


def test_a_handler_that_exits_leaves_its_request_answered_worker_lost(gateway, instance):
    gw = gateway("--app", "none", workers=0)
    ext = _External("-c", _EXIT_IN_HANDLER, instance)
    try:
        with duprep.Client("127.0.0.1", gw.port, timeout=30) as c:
            assert c.request(b"ping") == b"ping"
            _answered_worker_lost(c, b"exit")
        assert ext.proc.wait(30) == 0
    finally:
        ext.kill()


def _kill_everything(gw) -> None:
    family = [gw.pid, *descendants(gw.pid)]
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    gw.proc.wait()
    wait_until(lambda: not any(alive(p) for p in family), what="the killed processes to die")


def test_a_replier_never_delays_the_next_gateway_and_says_when_its_own_is_gone(gateway, instance):
    """A long-lived Replier held the attach lock: after kill -9 the next 'duprep serve' waited for it and
    gave up (exit 5), and one kept across a restart wrote into the old run's unlinked queue."""
    gw = gateway()
    keeper = bus.Replier(instance)
    try:
        _kill_everything(gw)
        with pytest.raises(duprep.BrokenResourceError):
            bus.Replier(instance)                        # a crashed run: no gateway to attach to
        gw2 = gateway()                                   # starts at once, the Replier notwithstanding
        with duprep.Client("127.0.0.1", gw2.port, name="till-7") as c:
            with pytest.raises(duprep.BrokenResourceError):
                keeper.push("till-7", b"from the old run")
            with bus.Replier(instance) as fresh:
                fresh.push("till-7", b"from this run")
            assert c.receive(timeout=20).data == b"from this run"
            gw2.stop()
            with pytest.raises(duprep.BrokenResourceError):
                keeper.clients()
    finally:
        keeper.close()


def test_a_selector_driven_worker_learns_that_the_gateway_stopped(gateway, instance):
    gw = gateway("--app", "none", workers=0)
    with bus.Worker(instance) as worker:
        with pytest.raises(duprep.WouldBlock):
            worker.receive_nowait()
        assert not select.select([worker.fileno()], [], [], 0)[0]      # idle: nothing to look at
        gw.stop()
        assert select.select([worker.fileno()], [], [], 20)[0], "fileno() must wake the selector"
        with pytest.raises(duprep.BrokenResourceError):
            worker.receive_nowait()


def test_a_supervised_worker_whose_handler_exits_0_is_answered_for_and_replaced(gateway, instance):
    """'duprep worker -n N' took exit 0 for 'the gateway stopped': a handler's os._exit(0) left its
    request unanswered and the worker not replaced while the gateway ran on."""
    gw = gateway("--app", "none", workers=0)
    ext = _External("-m", "duprep", "worker", "--instance", instance, "--app", "tests.apps:handle", "-n", "2")
    try:
        with duprep.Client("127.0.0.1", gw.port, timeout=30) as c:
            assert c.request(b"ping") == b"ping"
            _answered_worker_lost(c, b"exit0")
            wait_until(lambda: sum(1 for p in _worker_rows(instance) if p["pid"] != os.getpid()) >= 2 and
                       all(p.get("alive", True) for p in _worker_rows(instance)) or None, timeout=30,
                       what="a replacement worker")
            assert c.request(b"served again") == b"served again"
        gw.stop()
        assert ext.proc.wait(30) == 0             # the gateway's stop is still a clean exit
    finally:
        ext.kill()


def test_a_push_by_name_reaches_a_client_that_reconnected_at_once(gateway, instance):
    """Until the acceptor marks a closed connection's slot CLOSING, the slot still carried the client's
    name as READY: a push by name could pick it, and be dropped while the client, reconnected, waited."""
    gw = gateway("--app", "none", workers=0)
    old = duprep.Client("127.0.0.1", gw.port, name="till-9")
    gone = (old.sid, old.generation)
    new = socket.create_connection(("127.0.0.1", gw.port), timeout=10)       # accepted, no HELLO yet
    wait_until(lambda: len(snapshot(instance)["connections"]) == 2, what="the second connection")
    os.kill(gw.pid, signal.SIGSTOP)         # the acceptor is slow to hear that the old one closed
    try:
        old.close()
        new.sendall(encode_wire(Hello(1, "till-9")))
        wait_until(lambda: [c for c in snapshot(instance)["connections"] if c["name"] == "till-9" and c["ready"]
                            and (c["sid"], c["generation"]) != gone], what="the new connection to be READY")
        with bus.Replier(instance) as r:
            assert r.push("till-9", b"to the new one") != gone
        welcome, push = _frames(new, FrameReader(1 << 20), 2)
        assert isinstance(welcome, frame.Welcome) and push.data == b"to the new one"
    finally:
        os.kill(gw.pid, signal.SIGCONT)
        new.close()


def test_push_by_name_follows_a_client_to_its_new_slot(gateway, instance):
    """find_name remembers the slot it found a name in; a client that reconnects (in another slot, or
    the same one with a new generation) is found again; "" names no client, not an anonymous one."""
    gw = gateway("--app", "none", workers=0)
    first = duprep.Client("127.0.0.1", gw.port, name="till-4")
    anon = duprep.Client("127.0.0.1", gw.port)
    with bus.Replier(instance) as r:
        try:
            assert r.push("till-4", b"one") == (first.sid, first.generation)
            assert r.push("till-4", b"two") == (first.sid, first.generation)       # (from the cache)
            assert [first.receive(timeout=20).data for _ in range(2)] == [b"one", b"two"]
            with pytest.raises(duprep.UnknownTarget):
                r.push("", b"anonymous clients have no name")
            first.close()
            wait_until(lambda: len(snapshot(instance)["connections"]) == 1, what="the slot to be freed")
            with pytest.raises(duprep.UnknownTarget):
                r.push("till-4", b"nobody")
            others = [duprep.Client("127.0.0.1", gw.port, name=f"other-{i}") for i in range(3)]
            again = duprep.Client("127.0.0.1", gw.port, name="till-4")
            assert r.push("till-4", b"three") == (again.sid, again.generation)
            assert again.receive(timeout=20).data == b"three"
            for c in (*others, again):
                c.close()
        finally:
            first.close()
            anon.close()


_PUSH_FROM_ELSEWHERE = """
import sys
from duprep import bus
with bus.Replier(sys.argv[1]) as r:
    r.push("seen-from-afar", b"hello from another pid namespace")
print("pushed", flush=True)
"""


def test_a_replier_in_another_pid_namespace_attaches_and_pushes(gateway, instance):
    """There the acceptor's pid names another process or none: a Replier must go by the gateway lock,
    not refuse a running gateway as gone."""
    import shutil
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    gw = gateway("--app", "none", workers=0)
    with duprep.Client("127.0.0.1", gw.port, name="seen-from-afar") as c:
        out = subprocess.run(["unshare", "-pf", "--mount-proc", sys.executable, "-c", _PUSH_FROM_ELSEWHERE,
                              instance], env=ENV, capture_output=True, text=True, timeout=60)
        if out.returncode != 0 and "Operation not permitted" in out.stderr:
            pytest.skip("cannot create a pid namespace here")
        assert out.stdout.strip() == "pushed", out.stderr
        assert c.receive(timeout=20).data == b"hello from another pid namespace"


def test_receive_nowait_never_blocks_on_a_full_reply_queue(gateway, instance):
    """It used to flush, waiting up to 30 s for room: now replies that do not fit wait in the worker,
    fileno() wakes the selector when they can go, and past REPLY_BACKLOG it takes no more requests."""
    gw = gateway("--app", "none", workers=0)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    reader = FrameReader(1 << 20)
    [sender] = [p["pid"] for p in snapshot(instance)["processes"] if p["role"] == "sender"]
    n, payload = 600, b"r" * 1000                     # 600 KB of replies: far more than the queue holds
    try:
        with bus.Worker(instance) as worker:
            s.sendall(encode_wire(Hello(1, "")))
            assert isinstance(_frames(s, reader, 1)[0], frame.Welcome)
            os.kill(sender, signal.SIGSTOP)           # nobody empties the reply queue
            try:
                s.sendall(b"".join(encode_wire(Call(i, 5, 0, payload)) for i in range(1, n + 1)))
                answered, refused = 0, None
                deadline = time.monotonic() + 30
                while answered < n and refused is None and time.monotonic() < deadline:
                    t0 = time.monotonic()
                    try:
                        request = worker.receive_nowait()
                    except duprep.WouldBlock as e:
                        if "reply bytes wait" in str(e):
                            refused = e
                        continue
                    finally:
                        assert time.monotonic() - t0 < 1.0
                    worker.reply(request, request.data)
                    answered += 1
                assert refused is not None and answered < n, "the worker took every request"
            finally:
                os.kill(sender, signal.SIGCONT)
            while answered < n:                       # a selector loop: wait on fileno(), then take
                assert select.select([worker], [], [], 20)[0], "fileno() did not wake the selector"
                try:
                    while True:
                        request = worker.receive_nowait()
                        worker.reply(request, request.data)
                        answered += 1
                except duprep.WouldBlock:
                    pass
            worker.flush(timeout=20)
            replies = _frames(s, reader, n, timeout=60)
            assert sorted(f.msgid for f in replies) == list(range(1, n + 1))
    finally:
        s.close()
