"""The acceptor (seed ``tcp_s``): supervisor of the gateway and owner of every IPC object.

Reads top to bottom like gunicorn's arbiter:

1. **Boot** -- take the instance lock (refuse if another gateway has it;
   remove what a crashed run left behind), create the connection table and
   the two queues, listen, spawn the receiver and the sender and wait until
   both say READY, spawn the business workers, tell systemd READY=1.
2. **Serve** -- one epoll loop: accept (bounded per wake-up), admit or
   refuse (``--max-clients``, ``--max-per-ip``), hand each socket to the
   sender and then the receiver (SCM_RIGHTS) and keep a copy, so a restarted
   receiver or sender gets every connection back.  A slot is freed when both
   have released it; its generation changes on the next use.
3. **Supervise** -- children are watched through pidfds (no SIGCHLD, no
   polling).  A child that crashed is respawned with backoff; one that exits
   with a boot or config error code halts the gateway instead.
4. **Stop** (SIGTERM/SIGINT) -- stop accepting; the receiver stops reading
   and flushes; the sender delivers what is still coming and ends every
   connection; the workers stop; every IPC object is unlinked; exit 0.

Signal handlers only record the signal; the loop acts on it.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
import msgspec

from .. import fdpass, hangs, ipcnames, leftovers, queues, recovery, sched
from ..config import GatewayConfig
from ..errors import LimitError, WouldBlock
from ..fdpass import Op
from ..frame import CHUNK_OVERHEAD, LENGTH, MAX_NAME, CallMe, Error, ErrorCode, encode_wire
from ..lock import InstanceLock
from ..table import GatewayState, ProcRow, Role, SlotState, Table
from . import callback, net, systemd
from .control import Control
from .child import (EXIT_BOOT_ERROR, EXIT_BUSY, EXIT_CRASH, EXIT_OK, NO_RESPAWN, boot_failure, setup_logging, signal_name,
                    set_title)
from .base import STATS_INTERVAL
from .loop import READ, WRITE, EventLoop, Timer

log = logging.getLogger("duprep")

NPROCS = 128                   # 3 gateway rows + up to 125 worker rows
ACCEPTS_PER_WAKE = 64
STEP_TIMEOUT = 10.0            # seconds each stop step may take beyond drain_timeout
C_ACCEPTED, C_FULL, C_PER_IP, C_RELEASED, C_RESTARTS, C_LOST, C_HUNG = range(7)
# Queue-message bytes a frame body needs beside itself: the batch header, a Chunk's
# fields with the longest possible name (UTF-8), the array header of its frames.
BUS_OVERHEAD = 3 + CHUNK_OVERHEAD + 4 * MAX_NAME + 4


class Child:
    """One supervised process: receiver, sender or a business worker."""

    def __init__(self, role: str, index: int = 0) -> None:
        self.role = role
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        self.control: Control | None = None
        self.ready = False
        self.started = 0.0
        self.failures = 0
        self.stopped = False          # said STOPPED: its graceful stop is done
        self.aborted = False          # sent SIGABRT for hanging (hangs.py): a crash, not a boot failure
        self.warned = False           # logged that it has no heartbeat long after its start

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def __repr__(self) -> str:
        return f"{self.role}{self.index if self.role == 'worker' else ''}[{self.pid}]"


class Conn:
    """The acceptor's copy of one connection.

    ``sock`` is what the receiver reads and ``wsock`` what the sender writes:
    the same socket, except for callback links (L1 and L2).
    """

    __slots__ = ("sid", "gen", "sock", "wsock", "ip", "released", "pending")

    def __init__(self, sid: int, gen: int, sock: socket.socket, ip: str) -> None:
        self.sid, self.gen, self.sock, self.wsock, self.ip = sid, gen, sock, sock, ip
        self.released: set[str] = set()
        # a callback in progress (its deadline, then its dialer): not handed over yet
        self.pending: Timer | callback.CallbackDialer | None = None

    def close(self) -> None:
        for s in {self.sock, self.wsock}:
            s.close()


class Acceptor:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.instance = cfg.instance
        self.lock = InstanceLock(cfg.instance)
        self.loop = EventLoop()
        self.table: Table | None = None
        self.qs: list[queues.Queue] = []
        self.listener: socket.socket | None = None
        self.children: dict[str, Child] = {}
        self.conns: dict[int, Conn] = {}
        self.free: deque[int] = deque(range(cfg.max_clients))
        # Generations start at random values each run, so that a Request kept across a
        # restart of the gateway cannot match a new connection that got the same slot.
        rng = random.Random(secrets.randbits(64))
        self.gens = [rng.getrandbits(32) for _ in range(cfg.max_clients)]
        self.per_ip: dict[str, int] = {}
        self.held: deque[Conn] = deque()     # waiting for the sender's hand-over to go out first
        self.state = "booting"
        self.exit_code = EXIT_OK
        self.stop_timer: Timer | None = None
        self.row: ProcRow | None = None
        self.step = ""                  # stop sequence: receiver, sender, workers, done
        self.stats_timer: Timer | None = None
        self.step_asked = False
        self.lost_out: deque[bytes] = deque()   # ERROR WORKER_LOST messages waiting for reply-queue room
        self.drain_senders = 0                  # senders started for the stop's drain (at most 3)

    # ======================================================================
    # 1. boot
    # ======================================================================

    def run(self) -> int:
        try:
            self.boot()
        except BaseException as e:
            code = boot_failure(e)
            if code != EXIT_BUSY:          # what we created is ours to remove; a busy instance is not
                self.teardown()
            return code
        try:
            self.loop.run()
        except BaseException:
            # Before READY the gateway could not boot: 3, which systemd's RestartPreventExitStatus
            # does not restart. Once it was ready it crashed: 1, so that Restart=on-failure starts it
            # again. A code set earlier (a halt, a second SIGTERM) says more and is kept.
            booting = self.state == "booting"
            log.exception("acceptor crashed%s; stopping everything", " while booting" if booting else "")
            if self.exit_code == EXIT_OK:
                self.exit_code = EXIT_BOOT_ERROR if booting else EXIT_CRASH
        finally:
            self.teardown()
        return self.exit_code

    def boot(self) -> None:
        cfg = self.cfg
        watchdog = systemd.watchdog_interval()      # (first: it unsets the variables our children inherit)
        self.check_fd_limit()
        sched.apply(cfg.sched)        # before the children: they inherit it
        self.lock.acquire_gateway()
        self.remove_stale()
        limits = queues.kernel_limits()
        plan = queues.plan(depth=cfg.queue_depth, msgsize=cfg.queue_size, limits=limits)
        cfg.check_outbuf(plan.msgsize)          # (the size the kernel let us have: known only now)
        max_frame = plan.msgsize - BUS_OVERHEAD
        epoch = secrets.randbits(63)
        self.table = Table.create(
            ipcnames.table_name(self.instance), nslots=cfg.max_clients, nprocs=NPROCS, epoch=epoch,
            host=cfg.host, port=cfg.port, msgsize=plan.msgsize, depth=plan.depth, max_frame=max_frame,
            acceptor_pid=os.getpid(), max_per_ip=cfg.max_per_ip, heartbeat=cfg.heartbeat,
            hang_timeout=cfg.hang_timeout)
        self.row = ProcRow(self.table, 0, Role.ACCEPTOR)
        for name in (ipcnames.request_queue(self.instance), ipcnames.reply_queue(self.instance)):
            self.qs.append(queues.Queue(name, queues.create(name, plan, limits=limits)))
        log.info("queues: %d messages x %d bytes each (%d bytes of RLIMIT_MSGQUEUE=%d)%s; "
                 "largest frame %d bytes", plan.depth, plan.msgsize, 2 * plan.bytes,
                 limits.rlimit_msgqueue, f"; limited by {plan.clamped}" if plan.clamped else "", max_frame)
        self.listener = self.make_listener()
        host, port = self.listener.getsockname()[:2]
        self.table.set("port", port)
        self.table.set("host", host.encode()[:48])
        self.lock.share_attach()

        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal(sig, self.handle_term)
        loop.add_signal(signal.SIGHUP, self.handle_hup)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        loop.register(self.listener.fileno(), 0, self.on_listener)    # enabled once children are ready
        for role in ("sender", "receiver"):
            self.children[role] = Child(role)
        for i in range(cfg.workers if cfg.app else 0):
            self.children[f"worker{i}"] = Child("worker", i)
        for child in self.children.values():
            self.spawn(child)
        self.boot_timer = loop.call_later(STEP_TIMEOUT + 20, self.on_boot_timeout)
        self.beat()
        if watchdog:
            self.pet_watchdog(watchdog / 2)
        log.info("instance %s booting on %s:%d (max %d clients)", self.instance, host, port, cfg.max_clients)

    def check_fd_limit(self) -> None:
        """Make sure max_clients fits the descriptors the acceptor holds: one per client (two with
        callback links: L1 and L2), one pidfd per worker, and some for itself.

        Descriptors handed to the receiver and sender and not yet taken also count against the
        acceptor's RLIMIT_NOFILE for a user without CAP_SYS_RESOURCE (up to one per client for each
        of the two): room for them is raised too where the hard limit allows, and a hand-over beyond
        it waits (Control, InFlightLimit) rather than fail.
        """
        per_client = 2 if self.cfg.links == "callback" else 1
        need = self.cfg.max_clients * per_client + self.cfg.workers + 64
        want = need + 2 * self.cfg.max_clients
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < want:
            target = want if hard == resource.RLIM_INFINITY else min(hard, want)
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))     # children inherit it
                soft = target
        if soft < need:
            raise LimitError(
                f"--max-clients {self.cfg.max_clients} needs {need} open files in the acceptor "
                f"({per_client} per client, one per worker, 64 more), but RLIMIT_NOFILE allows {soft} (hard "
                f"limit {hard}). Fix: LimitNOFILE= in the systemd unit, 'ulimit -n' as root, or a smaller "
                f"--max-clients")

    def make_listener(self) -> socket.socket:
        sock = systemd.listen_socket()
        if sock is None:
            return net.listen(self.cfg.host, self.cfg.port, backlog=self.cfg.backlog)
        log.info("listening on the socket systemd passed (%s); --host and --port are not used",
                 sock.getsockname()[:2])
        return sock

    def remove_stale(self) -> None:
        """We hold both locks exclusively: anything of this instance is left from a crash."""
        removed = leftovers.remove(self.instance)
        if removed:
            log.warning("removed objects left by a crashed run of instance %s: %s",
                        self.instance, ", ".join(removed))

    def on_boot_timeout(self) -> None:
        if self.state == "booting":
            log.error("receiver and sender did not become ready in time")
            self.halt(EXIT_BOOT_ERROR)

    def became_ready(self) -> None:
        self.boot_timer.cancel()
        self.state = "ready"
        assert self.table is not None and self.listener is not None
        self.table.set("state", GatewayState.READY)
        self.loop.modify(self.listener.fileno(), READ)
        systemd.notify("READY=1")
        log.info("ready: accepting on %s:%d", *self.listener.getsockname()[:2])
        self.check_hung()

    def pet_watchdog(self, interval: float) -> None:
        """systemd's WatchdogSec=: this loop still turns (a hung acceptor gets SIGABRT from systemd)."""
        systemd.notify("WATCHDOG=1")
        self.loop.call_later(interval, lambda: self.pet_watchdog(interval))

    def beat(self) -> None:
        if self.row is not None:
            self.row.beat()
        self.loop.call_later(self.cfg.heartbeat, self.beat)

    def touch(self) -> None:
        """Counters changed: publish them within a second (no timer while nothing happens)."""
        if self.stats_timer is None:
            self.stats_timer = self.loop.call_later(STATS_INTERVAL, self.publish_stats)

    def publish_stats(self) -> None:
        self.stats_timer = None
        if self.row is not None:
            self.row.beat()

    # ======================================================================
    # 2. serve
    # ======================================================================

    def on_listener(self, _ev: int) -> None:
        assert self.listener is not None
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in net.ACCEPT_CAPACITY_ERRNOS:
                    log.error("accept: %s; pausing accepts for 100 ms", e.strerror)
                    self.set_accepting(False)
                    self.loop.call_later(0.1, lambda: self.set_accepting(self.state == "ready"))
                    return
                raise
            self.admit(sock, addr)

    def set_accepting(self, on: bool) -> None:
        if self.listener is not None and self.loop.registered(self.listener.fileno()):
            self.loop.modify(self.listener.fileno(), READ if on else 0)

    def admit(self, sock: socket.socket, addr: tuple[str, int] | tuple[str, int, int, int] | str) -> None:
        ip = str(addr[0]) if isinstance(addr, tuple) else "local"
        port = int(addr[1]) if isinstance(addr, tuple) else 0
        c = self.row.counters   # type: ignore[union-attr]
        if not self.free:
            c[C_FULL] += 1
            return self.refuse(sock, ErrorCode.SERVER_FULL, f"server full ({self.cfg.max_clients} clients)")
        if self.cfg.max_per_ip and self.per_ip.get(ip, 0) >= self.cfg.max_per_ip:
            c[C_PER_IP] += 1
            return self.refuse(sock, ErrorCode.TOO_MANY_FROM_IP,
                               f"too many connections from {ip} (max {self.cfg.max_per_ip})")
        try:
            self.tune(sock)
        except OSError:
            sock.close()
            return
        sid = self.free.popleft()
        gen = self.gens[sid] = (self.gens[sid] + 1) & 0xFFFFFFFF or 1
        self.table.a_part(sid).write(gen, SlotState.OPEN, port, time.time(), ip.encode())  # type: ignore[union-attr]
        conn = Conn(sid, gen, sock, ip)
        self.conns[sid] = conn
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        c[C_ACCEPTED] += 1
        self.table.set("accepted", c[C_ACCEPTED])  # type: ignore[union-attr]
        self.touch()
        if self.cfg.links == "callback":
            self.watch_first_frame(conn)
        else:
            self.hand_over_both(conn)

    def tune(self, sock: socket.socket) -> None:
        cfg = self.cfg
        net.tune_client(sock, sndbuf=cfg.sndbuf, keepalive=cfg.keepalive, write_timeout=cfg.write_timeout)

    def hand_over_both(self, conn: Conn) -> None:
        """The sender first: it must hold the socket before the receiver can queue a WELCOME for it.

        "First" means the sender's record is in its socket before the receiver's
        is sent: while the sender's channel has a backlog (or the sender is
        restarting) the receiver's hand-overs wait, in order.
        """
        sender = self.children["sender"]
        self.hand_over(sender, conn)
        if self.held or not sender.ready or sender.control is None or sender.control.outbox:
            self.held.append(conn)
        else:
            self.hand_over(self.children["receiver"], conn)

    def release_held(self) -> None:
        """The sender has caught up: the receiver gets the connections that waited for it."""
        sender = self.children["sender"]
        while self.held and sender.ready and sender.control is not None and not sender.control.outbox:
            conn = self.held.popleft()
            if self.conns.get(conn.sid) is conn:
                self.hand_over(self.children["receiver"], conn)

    def hand_over(self, child: Child, conn: Conn) -> None:
        if child.ready and child.control is not None and conn.pending is None:
            sock = conn.wsock if child.role == "sender" else conn.sock
            child.control.send(Op.CONN, conn.sid, conn.gen, sock.fileno())
        # else: it gets every connection when it is (re)started, or when the callback is done

    # --- callback links (--links callback) ------------------------------------------

    def watch_first_frame(self, conn: Conn) -> None:
        """Peek at the first frame: CALLME means connect back; anything else goes on as usual.

        Edge-triggered, because peeked bytes stay in the socket and would keep
        a level-triggered registration firing.
        """
        conn.pending = self.loop.call_later(self.cfg.handshake_timeout, lambda: self.callback_failed(
            conn, f"no first frame within {self.cfg.handshake_timeout:g} s"))
        self.loop.register(conn.sock.fileno(), READ | select.EPOLLET, lambda ev: self.on_first_bytes(conn))

    def on_first_bytes(self, conn: Conn) -> None:
        try:
            head = conn.sock.recv(4 + 64, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            head = b""
        if not head:
            self.loop.unregister(conn.sock.fileno())
            conn.pending.cancel()           # type: ignore[union-attr]
            self.free_slot(conn)            # gone before saying anything; no child has it
            return
        if len(head) < 6:
            return                          # wait for more (next edge)
        size = LENGTH.unpack_from(head)[0]
        if not (0x94 <= head[4] <= 0x9F and head[5] == CallMe.__struct_config__.tag and size <= 60):
            self.loop.unregister(conn.sock.fileno())
            conn.pending.cancel()           # type: ignore[union-attr]
            conn.pending = None
            self.hand_over_both(conn)       # a direct client: HELLO and all stay in the socket
            return
        if len(head) < 4 + size:
            return
        self.loop.unregister(conn.sock.fileno())
        conn.sock.recv(4 + size)            # consume the CALLME
        try:
            call = msgspec.msgpack.decode(head[4:4 + size], type=CallMe)
            dialer = callback.CallbackDialer(
                self.loop, conn.sock, call, timeout=self.cfg.handshake_timeout,
                on_done=lambda l1, l2: self.callback_done(conn, l1, l2),
                on_fail=lambda why: self.callback_failed(conn, why))
        except (msgspec.DecodeError, msgspec.ValidationError, callback.CallbackRefused) as e:
            self.callback_failed(conn, f"bad CALLME: {e}")
            return
        conn.pending.cancel()               # type: ignore[union-attr]
        conn.pending = dialer
        dialer.start()

    def callback_done(self, conn: Conn, l1: socket.socket, l2: socket.socket) -> None:
        log.info("sid %d: callback links to %s established", conn.sid, conn.ip)
        l0, conn.sock, conn.wsock = conn.sock, l1, l2
        for s in (l1, l2):
            self.tune(s)
        l0.close()                          # the daemon expects L0 to end here
        conn.pending = None
        self.hand_over_both(conn)

    def callback_failed(self, conn: Conn, why: str) -> None:
        if self.conns.get(conn.sid) is not conn or conn.pending is None:
            return
        if isinstance(conn.pending, callback.CallbackDialer):
            conn.pending.cancel()
        else:
            conn.pending.cancel()
            if self.loop.registered(conn.sock.fileno()):
                self.loop.unregister(conn.sock.fileno())
        conn.pending = None
        log.info("sid %d: callback from %s refused: %s", conn.sid, conn.ip, why)
        try:
            conn.sock.send(encode_wire(Error(0, 0, ErrorCode.BAD_HELLO, f"callback failed: {why}"[:200])))
        except OSError:
            pass
        self.free_slot(conn)

    def refuse(self, sock: socket.socket, code: int, message: str) -> None:
        log.info("refused a connection: %s", message)
        self.touch()
        self.table.set("refused", self.table.get("refused") + 1)  # type: ignore[union-attr]
        try:
            sock.setblocking(False)
            try:
                sock.recv(65536)        # unread input would turn our close into a RST
            except OSError:
                pass
            sock.send(encode_wire(Error(0, 0, code, message)))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def on_record(self, child: Child, rec: fdpass.Record) -> None:
        if rec.op == Op.RELEASED:
            self.released(child.role, rec.sid, rec.generation)
        elif rec.op == Op.READY:
            self.child_ready(child)
        elif rec.op == Op.STOPPED:
            child.stopped = True
            log.debug("%s finished its graceful stop", child.role)

    def released(self, role: str, sid: int, gen: int) -> None:
        conn = self.conns.get(sid)
        if conn is None or conn.gen != gen:
            return
        conn.released.add(role)
        if role == "sender" and conn.wsock is not conn.sock:
            try:       # callback links: the sender ended L2; end L1 too, so the receiver lets go
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if len(conn.released) == 1:
            self.table.a_part(sid).write(gen, SlotState.CLOSING, 0, 0.0, conn.ip.encode())  # type: ignore[union-attr]
        if {"receiver", "sender"} <= conn.released:
            self.free_slot(conn)

    def free_slot(self, conn: Conn) -> None:
        del self.conns[conn.sid]
        conn.close()
        self.table.a_part(conn.sid).write(conn.gen, SlotState.FREE, 0, 0.0, b"")  # type: ignore[union-attr]
        self.free.append(conn.sid)
        n = self.per_ip.get(conn.ip, 1) - 1
        if n:
            self.per_ip[conn.ip] = n
        else:
            self.per_ip.pop(conn.ip, None)
        self.row.counters[C_RELEASED] += 1   # type: ignore[union-attr]
        self.touch()

    # ======================================================================
    # 3. supervise
    # ======================================================================

    def spawn(self, child: Child) -> None:
        cfg = self.cfg
        env = dict(os.environ)
        pass_fds: tuple[int, ...] = ()
        if child.role == "worker":
            argv = [sys.executable, "-m", "duprep", "worker", "--instance", self.instance,
                    "--app", cfg.app or "", "-n", "1", "--sched", cfg.sched, "--supervised"]
        else:
            parent_end, child_end = fdpass.pair()
            argv = [sys.executable, "-m", f"duprep.gateway.{child.role}", "--config", cfg.encode(),
                    "--ctl-fd", str(child_end.fileno())]
            pass_fds = (child_end.fileno(),)
        try:
            # Own process group: a Ctrl-C or hang-up for the terminal's group reaches the acceptor
            # only, which stops the others in order (workers last, after the replies are out).
            child.proc = subprocess.Popen(argv, pass_fds=pass_fds, env=env, stdin=subprocess.DEVNULL,
                                          process_group=0)
        finally:
            if pass_fds:
                child_end.close()
        child.started = time.monotonic()
        child.stopped = False
        child.aborted = child.warned = False
        child.ready = child.role == "worker"
        child.pidfd = os.pidfd_open(child.proc.pid)
        self.loop.register(child.pidfd, READ, lambda ev: self.on_child_exit(child))
        if pass_fds:
            child.control = Control(parent_end, self.loop, lambda rec: self.on_record(child, rec),
                                    lambda: None,   # the pidfd tells us why it went
                                    self.release_held if child.role == "sender" else lambda: None)
        log.debug("spawned %r", child)

    def child_ready(self, child: Child) -> None:
        child.ready = True
        log.info("%s ready (pid %d)", child.role, child.pid)
        held = set(map(id, self.held)) if child.role == "receiver" else set()
        for conn in list(self.conns.values()):           # a restarted child gets every connection back
            if child.role not in conn.released and id(conn) not in held:
                self.hand_over(child, conn)
        if child.role == "sender":       # their Close may have died with the old sender
            self.close_let_go(child)
        if child.control is not None:
            child.control.send(Op.HANDED)       # the sender reads the reply queue only after this
        if child.role == "sender":
            self.release_held()
        if self.state == "booting" and all(self.children[r].ready for r in ("receiver", "sender")):
            self.became_ready()
        elif self.state in ("stopping", "halting"):
            self.stop_step()

    def on_child_exit(self, child: Child) -> None:
        assert child.proc is not None
        code = child.proc.wait()
        self.loop.unregister(child.pidfd)
        os.close(child.pidfd)
        child.pidfd = -1
        if child.control is not None:
            child.control.poll()                     # read what it said before dying
            if not child.control.closed:
                self.loop.close_later(child.control.sock)
            child.control = None
        was_ready, child.ready = child.ready, False
        how = f"exit code {code}" if code >= 0 else signal_name(-code)
        if child.role == "worker":         # also while stopping: the sender may still be draining
            self.answer_for(child)
        if self.state in ("stopping", "halting"):
            log.info("%r exited (%s)", child, how)
            self.stop_step()
            return
        if code in NO_RESPAWN or (not was_ready and child.role != "worker" and not child.aborted):
            log.error("%r cannot start (%s); stopping the gateway", child, how)
            self.halt(EXIT_BOOT_ERROR if code not in NO_RESPAWN else code)
            return
        self.row.counters[C_RESTARTS] += 1     # type: ignore[union-attr]
        self.row.beat()                         # type: ignore[union-attr]
        if time.monotonic() - child.started > 10:
            child.failures = 0
        delay = min(30.0, 0.25 * 2 ** child.failures)
        child.failures += 1
        if child.role == "sender":     # its successor gets every connection again and releases it again
            for conn in list(self.conns.values()):
                conn.released.discard(child.role)
        elif child.role == "receiver":
            # What it let go of (client gone, protocol violation) stays let go: its successor must not
            # read those connections again (it would take a cut or refused frame's rest for frames).
            # Their Close may have died in its backlog: the sender ends them itself.
            self.close_let_go(self.children["sender"])
        log.error("%r died (%s); restarting in %.2f s", child, how, delay)
        self.loop.call_later(delay, lambda: self.respawn(child))

    def close_let_go(self, sender: Child) -> None:
        """Tell the sender to end every connection the receiver let go of and the sender still holds."""
        if not sender.ready or sender.control is None:
            return                  # it gets them with CLOSE when it is ready (child_ready)
        for conn in self.conns.values():
            if "receiver" in conn.released and "sender" not in conn.released:
                sender.control.send(Op.CLOSE, conn.sid, conn.gen)

    def answer_for(self, child: Child) -> None:
        """A worker died: answer the requests it held with ERROR WORKER_LOST (recovery.py).

        Only if its row is still free: a worker that already claimed the row answered them itself.
        """
        assert self.table is not None and self.row is not None
        # Our row's state says "WORKER_LOST answers still to send" from before the dead row's counters
        # count them as handled until they are on the reply queue: a draining sender must not end the
        # connections in between (it did, now and then: the client got SHUTTING_DOWN instead).
        self.row.state = len(self.lost_out) + 1
        self.row.beat()
        lost = recovery.answer_for(self.table, self.lock, child.pid)
        if lost is None:
            self.row.state = len(self.lost_out)
            self.row.beat()
            return
        self.row.counters[C_LOST] += lost.requests + lost.sends
        log.error("%r died holding %d requests and %d sends; answered the requests with ERROR WORKER_LOST",
                  child, lost.requests, lost.sends)
        self.lost_out.extend(lost.answered)
        self.send_lost()

    def send_lost(self) -> None:
        """Put the WORKER_LOST answers on the reply queue; if it is full, again when it has room."""
        q = self.qs[1]                    # the reply queue (boot creates the request queue first)
        row = self.row
        assert row is not None
        while self.lost_out:
            try:
                q.put_nowait(self.lost_out[0])
            except WouldBlock:
                if not self.loop.registered(q.fileno()):
                    self.loop.register(q.fileno(), WRITE, lambda ev: self.send_lost())
                break
            self.lost_out.popleft()
        row.state = len(self.lost_out)    # what a draining sender waits for (answer_for)
        row.beat()
        if not self.lost_out:
            self.loop.unregister(q.fileno())

    def respawn(self, child: Child) -> None:
        if self.state in ("booting", "ready"):   # not if a stop began meanwhile (a worker may die while
            self.spawn(child)                    # the receiver and sender still boot)

    def check_hung(self) -> None:
        """Abort the children that stopped showing life (hangs.py); runs again at the next such deadline."""
        limit = self.cfg.hang_timeout
        if self.state != "ready" or not limit or self.table is None:
            return
        live = {c.pid: c for c in self.children.values() if c.pidfd >= 0 and not c.aborted}
        now = time.monotonic()
        wall = time.time() - now          # (Child.started is monotonic; rows say time.time())
        late, next_check = hangs.overdue(self.table, live, limit, now,
                                         {pid: wall + c.started for pid, c in live.items()})
        for pid, silent in late.items():
            self.abort(live[pid], silent)
        slow = [c for c in live.values() if not c.warned and now - c.started >= limit]
        for pid in hangs.rowless(self.table, [c.pid for c in slow]) if slow else ():
            child = live[pid]
            child.warned = True
            log.warning("%r has not started serving after %.0f s (no heartbeat yet: still importing its app, "
                        "or stuck before it?); it is not aborted for that", child, now - child.started)
        for c in live.values():       # (so that the warning comes on time too)
            if not c.warned and c.started + limit > now:
                next_check = min(next_check, c.started + limit)
        self.loop.call_at(next_check, self.check_hung)

    def abort(self, child: Child, silent: float) -> None:
        assert self.row is not None
        log.error("%r showed no sign of life for %.0f s (--hang-timeout %g): aborting it with SIGABRT (its "
                  "traceback follows) and replacing it", child, silent, self.cfg.hang_timeout)
        child.aborted = True
        self.row.counters[C_HUNG] += 1
        self.touch()
        hangs.abort(child.pidfd)
        proc = child.proc

        def kill() -> None:
            if child.proc is proc and child.pidfd >= 0:
                log.error("%r still there %g s after SIGABRT: killing it", child, hangs.ABORT_GRACE)
                hangs.kill(child.pidfd)
        self.loop.call_later(hangs.ABORT_GRACE, kill)

    # ======================================================================
    # 4. stop
    # ======================================================================

    def handle_term(self, signum: int) -> None:
        if self.state in ("stopping", "halting"):
            log.warning("second %s: stopping now, without draining", signal.Signals(signum).name)
            self.exit_code = EXIT_CRASH
            self.kill_all()
            self.loop.stop()
            return
        log.info("%s: stopping gracefully", signal.Signals(signum).name)
        self.begin_stop("stopping")

    def handle_hup(self, signum: int) -> None:
        log.info("SIGHUP: nothing to reload (configuration is fixed at start)")

    def halt(self, code: int) -> None:
        self.exit_code = code
        self.begin_stop("halting")

    def begin_stop(self, state: str) -> None:
        booting = self.state == "booting"
        self.state = state
        systemd.notify("STOPPING=1")
        if self.table is not None:
            self.table.set("state", GatewayState.STOPPING)
        if self.listener is not None:
            self.loop.unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None
        if booting:
            self.kill_all()
        self.step = "receiver"
        self.step_asked = False
        self.stop_step()

    def stop_step(self) -> None:
        """Advance the stop sequence: receiver, then sender, then workers, then exit."""
        if self.state not in ("stopping", "halting"):
            return
        order = ["receiver", "sender", "workers", "done"]
        while self.step != "done":
            alive = [c for c in self.children.values() if self.matches(c, self.step) and c.proc
                     and c.proc.poll() is None]
            if not alive and self.step == "sender" and self.state == "stopping" and self.conns \
                    and not self.children["sender"].stopped and self.drain_senders < 3:
                # The sender is down (the stop found it between a crash and its restart, or it died
                # while draining): start one, or what is queued would never reach the clients.
                self.drain_senders += 1
                self.step_asked = False
                log.info("starting a sender to deliver what is queued before stopping")
                self.spawn(self.children["sender"])
                self.arm_stop_timer(STEP_TIMEOUT)
                return
            if not alive:
                self.step = order[order.index(self.step) + 1]
                self.step_asked = False
                continue
            if self.step == "sender" and not all(c.ready for c in alive):
                if self.stop_timer is None:      # a sender that never finishes booting is killed
                    self.arm_stop_timer(STEP_TIMEOUT)
                return            # still booting: child_ready() calls us again
            if not self.step_asked:
                self.step_asked = True
                for c in alive:
                    if c.control is not None and c.ready and not c.control.closed:
                        c.control.send(Op.STOP)
                    else:
                        c.proc.send_signal(signal.SIGTERM)   # type: ignore[union-attr]
                self.arm_stop_timer(STEP_TIMEOUT + (self.cfg.drain_timeout if self.step == "sender" else 0))
            return
        self.loop.stop()

    def arm_stop_timer(self, limit: float) -> None:
        if self.stop_timer is not None:
            self.stop_timer.cancel()
        self.stop_timer = self.loop.call_later(limit, self.on_step_timeout)

    @staticmethod
    def matches(child: Child, step: str) -> bool:
        return child.role == step or (step == "workers" and child.role == "worker")

    def on_step_timeout(self) -> None:
        self.stop_timer = None
        for c in self.children.values():
            if self.matches(c, self.step) and c.proc and c.proc.poll() is None:
                log.error("%r did not stop in time; killing it", c)
                c.proc.kill()

    def kill_all(self) -> None:
        for c in self.children.values():
            if c.proc and c.proc.poll() is None:
                c.proc.kill()

    def teardown(self) -> None:
        """Wait for every child, close every socket, unlink every IPC object."""
        for c in self.children.values():
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
            if c.proc is not None:
                c.proc.wait()
        for conn in self.conns.values():
            for s in {conn.sock, conn.wsock}:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            conn.close()
        self.conns.clear()
        if self.listener is not None:
            self.listener.close()
        for q in self.qs:
            q.close()
            queues.unlink(q.name)
        if self.table is not None:
            if self.row is not None:
                self.row.clear()
            self.table.close()
            self.table.unlink()
            self.table = None
        if self.lock.fd >= 0:
            self.lock.unlink()
            self.lock.close()
        self.loop.close()
        log.info("stopped; IPC objects of instance %s removed", self.instance)


def serve(cfg: GatewayConfig) -> int:
    """Run a gateway in the foreground until SIGTERM/SIGINT; return the exit code."""
    setup_logging("acceptor", cfg.instance)
    set_title("acceptor", cfg.instance)
    return Acceptor(cfg).run()
