"""The client daemon (seed ``tcp_c``): one link to the gateway for every local process.

A client host runs many business processes (the seed's ``c_process``) that
never touch the network; this daemon holds the host's connection and
carries their requests.  To the gateway it is one ordinary client: one row
in ``duprep status``, one ``--max-clients`` slot, however many local
processes use it.

Data path (all in one epoll loop, :class:`~duprep.gateway.loop.EventLoop`;
the next timer deadline is the only timeout, nothing polls)::

    local process --LCall(ep, msgid)--> uplink queue --> daemon
        daemon: msgid -> daemon-wide wire msgid (routes.py), cpid = local pid
    daemon --CALL(wire msgid, cpid)--> gateway ... REPLY(wire msgid) --> daemon
        daemon: wire msgid -> (endpoint, local msgid)
    daemon --Reply(local msgid)--> that endpoint's own reply queue --> local process

Failure handling, each the answer to something the seed got wrong:

* **Link loss** -- every request waiting on the link fails at once with
  Broken (the caller sees BrokenResourceError naming the gateway and the
  reason, not a 20 s timeout); new requests fail the same way while the
  link is down; the link is redialled with backoff and jitter (link.py);
  local processes keep their endpoints and need no restart.
* **Orphans** -- a local process that dies is noticed through its pidfd
  (endpoints.py): replies waiting for it are discarded and counted, its
  queues unlinked, answers still to come are discarded and counted when they
  arrive (routes.py).  No reboot, no ``ipcrm``.
* **Crash of the daemon** -- the instance lock (instance.py) lets the next
  daemon remove what this one left behind.

Owns: the uplink queue (created here, unlinked on exit), the daemon's
handles on every reply queue and the right to unlink them when their
owner is dead or at exit, the link sockets, the status socket, the
instance lock, info and registry files.  SIGTERM/SIGINT: stop taking
requests, wait up to ``drain_timeout`` for the answers already asked for
(no longer than their requesters wait), then tear everything down; a second
signal skips the wait.  Requests never answered (a handler that returns
None) are forgotten ``late_grace`` after their timeout, and at most
``max_routes`` are remembered (routes.py).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import msgspec

from .. import ipcnames, queues
from ..errors import LimitError, WouldBlock
from ..frame import Call, Defer, Error, ErrorCode, Push, Relay, Reply, Send, Welcome, encode_wire
from ..gateway import systemd
from ..gateway.child import (
    boot_failure,
    EXIT_BUSY,
    EXIT_CRASH,
    EXIT_OK,
    reset_signals,
    set_title,
    setup_logging,
)
from ..gateway.loop import READ, EventLoop, Timer
from . import procid
from .config import DaemonConfig
from .control import StatusServer
from .endpoints import AttachError, Endpoint, Endpoints, LocalProcess
from .instance import DaemonInfo, DaemonLock, publish_info, remove_stale, write_registry
from .link import Link
from .protocol import (
    LOCAL_VERSION,
    Attach,
    Attached,
    Broken,
    Detach,
    LCall,
    LRelay,
    LSend,
    Refused,
    encode,
    split_down,
    up_decoder,
)
from .routes import Routes

__all__ = ["ClientDaemon", "serve", "COUNTERS"]

log = logging.getLogger("duprep")

UPLINK_MESSAGES_PER_WAKE = 512      # then let the link and the reply queues have a turn
BROKEN_IDS_PER_MESSAGE = 512        # msgids per Broken message (9 bytes each at most)

COUNTERS = (
    "attached",            # endpoints attached
    "detached",            # endpoints closed by their process
    "refused",             # Attach refused (dead owner, bad version, missing queue)
    "processes_exited",    # local processes found dead through their pidfd
    "requests",            # REQUEST and RELAY frames forwarded to the gateway
    "sends",               # SEND frames forwarded
    "replies",             # answers delivered to a reply queue
    "pushes",              # PUSH frames delivered
    "pushes_unrouted",     # PUSH frames for no attached process: discarded
    "orphaned_requests",   # requests whose process died or closed before the answer
    "orphan_replies",      # answers for a dead or closed endpoint: discarded
    "failed_link_down",    # requests refused at once because the link was down
    "failed_link_lost",    # requests failed because the link broke under them
    "too_large",           # requests refused: larger than the gateway's max_frame
    "unknown_endpoint",    # uplink messages naming no attached endpoint
    "unmatched",           # answers with a msgid the daemon does not wait for (never sent, or forgotten)
    "expired",             # requests forgotten unanswered: late_grace seconds past their timeout_ms
    "forgotten",           # requests forgotten unanswered: max_routes were waiting (the oldest goes)
    "bad_messages",        # undecodable uplink messages
    "dropped_slow",        # replies dropped: an endpoint had max_pending waiting
)


class ClientDaemon:
    """One client daemon; :meth:`run` returns the exit code."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.instance = cfg.instance
        self.loop = EventLoop()
        self.lock = DaemonLock(cfg.instance)
        self.uplink: queues.Queue | None = None
        self.endpoints = Endpoints(cfg.instance, self.loop, max_pending=cfg.max_pending,
                                   on_exit=self.on_process_exit)
        self.routes = Routes(orphan_memory=cfg.orphan_memory, max_routes=cfg.max_routes, grace=cfg.late_grace)
        self.link = Link(cfg, self.loop, on_up=self.on_link_up, on_frame=self.on_gateway_frame,
                         on_down=self.on_link_down)
        self.status = StatusServer(cfg.instance, self.loop, self.snapshot)
        self.decoder = up_decoder()
        self.c = dict.fromkeys(COUNTERS, 0)
        self.state = "booting"
        self.started = time.time()
        self.max_frame = 0              # from the last WELCOME
        self.uplink_paused = False
        self.drain_timer: Timer | None = None
        self.expiry_timer: Timer | None = None    # armed while routes with a deadline exist
        self.pid = os.getpid()

    # ======================================================================
    # boot
    # ======================================================================

    def run(self) -> int:
        try:
            self.boot()
        except BaseException as e:
            code = boot_failure(e)
            if code != EXIT_BUSY:          # what we created is ours to remove; a busy instance is not
                self.teardown()
            return code
        code = EXIT_OK
        try:
            self.loop.run()
        except BaseException:            # booted, so a crash (1: Restart=on-failure starts it again), not 3
            log.exception("client daemon crashed; cleaning up")
            code = EXIT_CRASH
        finally:
            self.teardown()
        return code

    def boot(self) -> None:
        cfg = self.cfg
        self.lock.acquire()
        for left in remove_stale(self.instance):
            log.info("reply queue %s of an earlier run: its process %d lives; watching it", left.name, left.pid)
            self.endpoints.adopt(left)
        name = ipcnames.clienthost_uplink(self.instance)
        plan = queues.QueuePlan(depth=cfg.uplink_depth, msgsize=cfg.uplink_size)
        try:
            self.uplink = queues.Queue(name, queues.create(name, plan))
        except LimitError as e:
            raise LimitError(f"{e} (client daemon: --uplink-depth/--uplink-size set this queue)") from None
        self.status.open()
        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal(sig, self.handle_term)
        loop.add_signal(signal.SIGHUP, lambda _s: log.info("SIGHUP: nothing to reload"))
        loop.register(self.uplink.fileno(), READ, self.on_uplink_readable)
        loop.before_sleep(self.before_sleep)
        publish_info(self.instance, DaemonInfo(
            version=LOCAL_VERSION, pid=self.pid, start=procid.start_time(self.pid), uplink=name,
            uplink_size=cfg.uplink_size, reply_depth=cfg.reply_depth, reply_size=cfg.reply_size,
            server=cfg.server, name=cfg.name))
        self.write_registry()
        self.state = "running"
        self.link.start()
        systemd.notify("READY=1")
        log.info("client daemon %s ready: uplink %s (%d x %d B), reply queues %d x %d B, gateway %s (%s links)",
                 self.instance, name, cfg.uplink_depth, cfg.uplink_size, cfg.reply_depth, cfg.reply_size,
                 cfg.server, cfg.links)

    # ======================================================================
    # local side: the uplink queue
    # ======================================================================

    def on_uplink_readable(self, _ev: int) -> None:
        assert self.uplink is not None
        decode = self.decoder.decode
        for _ in range(UPLINK_MESSAGES_PER_WAKE):
            try:
                data = self.uplink.get_nowait()
            except WouldBlock:
                return
            try:
                msg = decode(data)
            except (msgspec.DecodeError, ValueError, RecursionError) as e:
                self.c["bad_messages"] += 1
                log.warning("dropped an undecodable uplink message: %s", e)
                continue
            kind = type(msg)
            try:
                if kind is LCall:
                    self.on_call(msg)
                elif kind is LSend:
                    self.on_send(msg)
                elif kind is LRelay:
                    self.on_relay(msg)
                elif kind is Attach:
                    self.on_attach(msg)
                elif kind is Detach:
                    self.on_detach(msg)
            except Exception:       # one local process's bad message must not end the service for all
                self.c["bad_messages"] += 1
                log.exception("dropped an uplink message the daemon could not handle: %r", msg)
            if self.link.out_bytes > self.cfg.max_outbuf:
                return                 # before_sleep pauses the uplink until the link drains

    def on_attach(self, msg: Attach) -> None:
        try:
            ep = self.endpoints.attach(msg)
        except AttachError as e:
            self.c["refused"] += 1
            log.warning("refused attach of pid %d: %s", msg.pid, e)
            if e.queue is not None:
                try:
                    for piece in split_down(encode(Refused(str(e))), e.queue.msgsize):
                        e.queue.put_nowait(piece)
                except (WouldBlock, OSError, ValueError):
                    pass
                e.queue.close()
            return
        self.c["attached"] += 1
        w = self.link.welcome
        self.endpoints.deliver(ep, encode(Attached(
            ep.ep, self.pid, w.name if w else self.cfg.name, self.max_frame, self.link.up,
            w.sid if w else 0, w.generation if w else 0)))
        log.debug("attached pid %d endpoint %d (%s)", ep.pid, ep.ep, ep.name)

    def on_detach(self, msg: Detach) -> None:
        ep = self._endpoint(msg.ep, msg.pid)
        if ep is None:
            return
        self.c["detached"] += 1
        self.c["orphaned_requests"] += self.routes.orphan(ep.ep)
        self.endpoints.detach(ep)

    def _endpoint(self, ep_id: int, pid: int) -> Endpoint | None:
        ep = self.endpoints.get(ep_id)
        if ep is None or ep.pid != pid:
            self.c["unknown_endpoint"] += 1
            return None
        return ep

    def _refuse_now(self, ep: Endpoint, msgid: int) -> bool:
        """Answer at once if the request cannot go out; True if it was answered."""
        if self.state != "running":
            self.c["failed_link_down"] += 1
            self.endpoints.deliver(ep, encode(Broken("the client daemon is stopping", [msgid])))
            return True
        if not self.link.up:
            self.c["failed_link_down"] += 1
            self.endpoints.deliver(ep, encode(Broken(self.link.describe_down(), [msgid])))
            return True
        return False

    def _forward(self, ep: Endpoint, msgid: int, frame: msgspec.Struct, wire: int) -> None:
        data = encode_wire(frame)
        if self.max_frame and len(data) - 4 > self.max_frame:
            self.routes.resolve(wire, final=True)
            self.c["too_large"] += 1
            self.endpoints.deliver(ep, encode(Error(
                msgid, ep.pid, ErrorCode.FRAME_TOO_LARGE,
                f"frame of {len(data) - 4} bytes exceeds the gateway's max_frame {self.max_frame}")))
            return
        ep.requests += 1
        self.link.send(data)

    def on_call(self, msg: LCall) -> None:
        ep = self._endpoint(msg.ep, msg.pid)
        if ep is None or self._refuse_now(ep, msg.msgid):
            return
        due = self.loop.clock() + msg.timeout_ms / 1000 if msg.timeout_ms else 0.0
        wire = self._route(ep, msg.msgid, due)
        self.c["requests"] += 1
        self._forward(ep, msg.msgid, Call(wire, ep.proc.cpid, msg.timeout_ms, msg.data), wire)

    def on_relay(self, msg: LRelay) -> None:
        ep = self._endpoint(msg.ep, msg.pid)
        if ep is None or self._refuse_now(ep, msg.msgid):
            return
        wire = self._route(ep, msg.msgid, 0.0)        # the gateway acknowledges every RELAY at once
        self.c["requests"] += 1
        self._forward(ep, msg.msgid, Relay(wire, ep.proc.cpid, msg.target, msg.data), wire)

    def _route(self, ep: Endpoint, msgid: int, due: float) -> int:
        """A wire msgid for a request; tell the requester of a route forgotten to make room."""
        wire, evicted = self.routes.add(ep.ep, msgid, due=due)
        if evicted is not None:
            self.c["forgotten"] += 1
            old = self.endpoints.get(evicted.ep)
            if old is not None:
                self.endpoints.deliver(old, encode(Broken(
                    f"the client daemon forgot this request unanswered: {self.cfg.max_routes} newer "
                    f"requests are waiting for answers (client-daemon --max-routes)", [evicted.msgid])))
        if due:
            when = due + self.cfg.late_grace
            if self.expiry_timer is None or when < self.expiry_timer.deadline:
                if self.expiry_timer is not None:
                    self.expiry_timer.cancel()
                self.expiry_timer = self.loop.call_at(when, self.expire_routes)
        return wire

    def expire_routes(self) -> None:
        """Forget requests nobody waits for any more (a handler that returned None never answers)."""
        expired, more = self.routes.expire(self.loop.clock())
        self.c["expired"] += expired
        # Routes are looked at every late_grace seconds while some have a deadline: one is
        # forgotten between late_grace and twice that after its timeout, and an idle daemon sleeps.
        self.expiry_timer = self.loop.call_later(self.cfg.late_grace, self.expire_routes) if more else None

    def on_send(self, msg: LSend) -> None:
        ep = self._endpoint(msg.ep, msg.pid)
        if ep is None or self._refuse_now(ep, msg.msgid):
            return
        self.c["sends"] += 1
        wire = self.routes.next_id()
        data = encode_wire(Send(wire, ep.proc.cpid, msg.data))
        if self.max_frame and len(data) - 4 > self.max_frame:
            self.c["too_large"] += 1
            self.endpoints.deliver(ep, encode(Error(
                msg.msgid, ep.pid, ErrorCode.FRAME_TOO_LARGE,
                f"frame of {len(data) - 4} bytes exceeds the gateway's max_frame {self.max_frame}")))
            return
        ep.requests += 1
        self.link.send(data, send_of=(ep.ep, msg.msgid))

    # ======================================================================
    # gateway side: the link
    # ======================================================================

    def on_link_up(self, welcome: Welcome) -> None:
        self.max_frame = welcome.max_frame

    def on_gateway_frame(self, frame: object) -> None:
        kind = type(frame)
        if kind is Push:
            self.on_push(frame)   # type: ignore[arg-type]
            return
        final = kind is not Defer
        wire: int = frame.msgid   # type: ignore[attr-defined]
        route = self.routes.resolve(wire, final=final)
        if route is None:
            if self.routes.take_orphan(wire, final=final):
                if final:
                    self.c["orphan_replies"] += 1
            else:
                self.c["unmatched"] += 1
            return
        ep = self.endpoints.get(route.ep)
        if ep is None:                        # an answer after WORKER_LOST for an endpoint gone since
            self.c["orphan_replies"] += 1
            return
        if kind is Error and frame.code == ErrorCode.WORKER_LOST:   # type: ignore[attr-defined]
            self.routes.worker_lost(wire, route)   # a REPLY may still follow (protocol.md 1.6)
        if kind is Reply:            # (locally, cpid is the process's own pid again)
            out: msgspec.Struct = Reply(route.msgid, ep.pid, frame.data)       # type: ignore[attr-defined]
        elif kind is Defer:
            out = Defer(route.msgid, ep.pid)
        else:
            out = Error(route.msgid, ep.pid, frame.code, frame.message)        # type: ignore[attr-defined]
        self._deliver(ep, out)

    def _deliver(self, ep: Endpoint, out: msgspec.Struct) -> None:
        if self.endpoints.deliver(ep, encode(out)):
            self.c["pushes" if type(out) is Push else "replies"] += 1
        else:
            self.c["dropped_slow"] += 1

    def on_push(self, push: Push) -> None:
        """A PUSH with a cpid goes to that process only (dropped if it is gone: never to another one);
        one without goes to every endpoint that takes pushes."""
        if push.cpid:
            proc = self.endpoints.process(*procid.from_cpid(push.cpid))
            targets = list(proc.endpoints.values()) if proc is not None else []
            takers = [e for e in targets if e.pushes]
            targets = takers or targets[:1]
            push = Push(proc.pid if proc is not None else 0, push.source, push.data)
        else:
            targets = self.endpoints.push_takers()
        if not targets:
            self.c["pushes_unrouted"] += 1
            return
        for ep in targets:
            self._deliver(ep, push)

    def on_link_down(self, reason: str) -> None:
        """Fail every request the lost link was carrying, at once."""
        text = f"lost the link to gateway {self.cfg.server}: {reason}" if self.state == "running" else reason
        failed = self.routes.fail_all()
        for ep_id, msgid in self.link.take_unsent():    # SENDs the link dropped before writing them
            failed.setdefault(ep_id, []).append(msgid)
        for ep_id, msgids in failed.items():
            ep = self.endpoints.get(ep_id)
            if ep is None:
                continue
            self.c["failed_link_lost"] += len(msgids)
            for i in range(0, len(msgids), BROKEN_IDS_PER_MESSAGE):
                self.endpoints.deliver(ep, encode(Broken(text, msgids[i:i + BROKEN_IDS_PER_MESSAGE])))
        if self.state == "draining":
            self.loop.stop()

    # ======================================================================
    # orphans
    # ======================================================================

    def on_process_exit(self, proc: LocalProcess, gone: list[Endpoint], discarded: int) -> None:
        self.c["processes_exited"] += 1
        self.c["orphan_replies"] += discarded
        orphaned = sum(self.routes.orphan(ep.ep) for ep in gone)
        self.c["orphaned_requests"] += orphaned
        if gone or discarded:
            log.info("local process %d exited: %d endpoint(s) removed, %d answer(s) discarded, "
                     "%d request(s) orphaned", proc.pid, len(gone), discarded, orphaned)

    # ======================================================================
    # every loop iteration
    # ======================================================================

    def before_sleep(self) -> None:
        self.link.flush()
        over = self.link.out_bytes > self.cfg.max_outbuf
        if over != self.uplink_paused and self.uplink is not None:
            self.uplink_paused = over
            self.loop.modify(self.uplink.fileno(), 0 if over else READ)
        if self.endpoints.changed:
            self.endpoints.changed = False
            self.write_registry()
        if self.state == "draining" and not self.routes.waiting(include_deferred=False):
            self.loop.stop()

    def write_registry(self) -> None:
        try:
            write_registry(self.instance, self.endpoints.queue_names())
        except OSError as e:
            log.error("cannot write the reply-queue registry: %s", e)

    # ======================================================================
    # stop
    # ======================================================================

    def handle_term(self, signum: int) -> None:
        if self.state == "draining":
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            self.loop.stop()
            return
        waiting = self.routes.waiting(include_deferred=False)
        # No need to wait beyond the moment the last requester gives up: what comes later is late.
        wait = self.cfg.drain_timeout
        last = self.routes.last_due()
        if last is not None:
            wait = min(wait, max(0.0, last - self.loop.clock()))
        log.info("%s: stopping (%d answer(s) outstanding, waiting at most %g s)",
                 signal.Signals(signum).name, waiting, wait)
        self.state = "draining"
        systemd.notify("STOPPING=1")
        self.drain_timer = self.loop.call_later(wait, self.loop.stop)

    def teardown(self) -> None:
        """Close the link, unlink every queue and file this daemon owns, release the lock."""
        self.state = "stopped"
        self.link.stop()
        self.status.close()
        self.endpoints.close_all()
        if self.uplink is not None:
            if self.loop.registered(self.uplink.fileno()):
                self.loop.unregister(self.uplink.fileno())
            self.uplink.close()
            queues.unlink(self.uplink.name)
            self.uplink = None
        if self.lock.fd >= 0:
            names = ipcnames.clienthost_all_names(self.instance)
            for key in ("info", "registry"):
                try:
                    os.unlink(names[key])
                except FileNotFoundError:
                    pass
            self.lock.release()
        self.loop.close()
        log.info("stopped; queues of client daemon %s removed", self.instance)

    # ======================================================================
    # status
    # ======================================================================

    def snapshot(self) -> dict[str, Any]:
        """Everything ``duprep client-status`` shows, as plain data."""
        link, w = self.link, self.link.welcome
        uplink: dict[str, Any] = {"name": ipcnames.clienthost_uplink(self.instance), "paused": self.uplink_paused}
        if self.uplink is not None:
            uplink.update(messages=self.uplink.depth_now(), capacity=self.uplink.depth,
                          message_size=self.uplink.msgsize)
        procs = []
        for proc in self.endpoints.processes():
            eps = []
            for ep in proc.endpoints.values():
                waiting, deferred = self.routes.in_flight(ep.ep)
                try:
                    qmsgs = ep.queue.depth_now()
                except Exception:     # noqa: BLE001 - status must not fail on one queue
                    qmsgs = -1
                eps.append({"ep": ep.ep, "n": ep.n, "queue": ep.name, "pushes": ep.pushes,
                            "in_flight": waiting, "deferred": deferred, "queue_messages": qmsgs,
                            "pending": len(ep.pending), "requests": ep.requests, "replies": ep.replies,
                            "dropped": ep.dropped, "attached_at": ep.attached_at})
            procs.append({"pid": proc.pid, "start": proc.start, "endpoints": eps, "leftovers": list(proc.leftovers)})
        return {
            "instance": self.instance, "pid": self.pid, "state": self.state, "started": self.started,
            "server": self.cfg.server, "links": self.cfg.links, "name": self.cfg.name,
            "link": {"state": link.state, "sid": w.sid if w else 0, "generation": w.generation if w else 0,
                     "max_frame": self.max_frame, "up_since": link.up_since if link.up else 0.0,
                     "connects": link.connects, "losses": link.losses, "attempts": link.attempts,
                     "last_error": link.last_error,
                     "next_attempt_in": round(max(0.0, link.next_attempt - self.loop.clock()), 3)
                     if link.state == "down" else 0.0,
                     "out_bytes": link.out_bytes, "sends_unwritten": len(link.sends),
                     "frames_in": link.frames_in, "frames_out": link.frames_out},
            "uplink": uplink, "reply_depth": self.cfg.reply_depth, "reply_size": self.cfg.reply_size,
            "in_flight": self.routes.waiting(), "overdue": self.routes.overdue(self.loop.clock()),
            "orphans_remembered": self.routes.orphans,
            "counters": dict(self.c), "processes": procs,
        }


def serve(cfg: DaemonConfig) -> int:
    """Run a client daemon in the foreground until SIGTERM/SIGINT; return the exit code."""
    setup_logging("clientd", cfg.instance)
    set_title("clientd", cfg.instance)
    reset_signals()
    return ClientDaemon(cfg).run()
