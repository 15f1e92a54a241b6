"""``duprep``: a thin command line over the library (``duprep --help`` lists the commands)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable, TypeAlias

from . import ipcnames, sched
from .config import DEFAULT_APP, GatewayConfig, resolve_port
from .errors import BrokenResourceError, ConfigError, DuprepError, InstanceBusyError, ProtocolError

__all__ = ["main"]


def _cwd_on_path() -> None:
    """Put the current directory first on sys.path, as gunicorn does for its app.

    So ``--app mymodule:handle`` finds ``mymodule.py`` in the directory the
    command runs in: the ``duprep`` console script, unlike ``python -m``,
    does not put it there.  Supervised workers inherit the gateway's.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def load_app(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:CALLABLE`` (the current directory first on sys.path)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"--app must be MODULE:CALLABLE, got {spec!r}")
    _cwd_on_path()
    obj: object
    try:
        obj = importlib.import_module(module)
    except Exception as e:           # any failure at import time means this app cannot boot
        raise ConfigError(f"cannot import {module!r} for --app: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{module!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ConfigError(f"--app {spec!r} is not callable")
    handler: Callable[..., Any] = obj
    return handler


def check_app(spec: str) -> None:
    """Check that ``MODULE:CALLABLE`` names an importable module, without importing it here
    (the acceptor should not carry the business code; workers import it)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"--app must be MODULE:CALLABLE, got {spec!r}")
    _cwd_on_path()
    try:
        found = importlib.util.find_spec(module)     # imports parent packages, which may fail in any way
    except Exception as e:
        raise ConfigError(f"cannot find module {module!r} for --app: {e}") from None
    if found is None:
        raise ConfigError(f"cannot find module {module!r} for --app (not in the current directory "
                          f"{os.getcwd()} nor on PYTHONPATH)")


def cmd_serve(args: argparse.Namespace) -> int:
    from .gateway.acceptor import serve
    cfg = GatewayConfig(
        instance=args.instance, host=args.host, port=resolve_port(args.port), workers=args.workers,
        app=None if args.app == "none" else args.app, max_clients=args.max_clients,
        max_per_ip=args.max_per_ip, queue_depth=args.queue_depth, queue_size=args.queue_size,
        handshake_timeout=args.handshake_timeout, max_outbuf=args.max_outbuf,
        write_timeout=args.write_timeout, drain_timeout=args.drain_timeout, links=args.links,
        sched=args.sched, heartbeat=args.heartbeat, hang_timeout=args.hang_timeout, keepalive=args.keepalive)
    if cfg.app:
        check_app(cfg.app)    # fail here, clearly, rather than in every worker
    return serve(cfg)


def cmd_worker(args: argparse.Namespace) -> int:
    from . import bus
    from .gateway.child import EXIT_BOOT_ERROR, setup_logging, set_title
    if args.n < 1:
        raise ConfigError(f"-n must be at least 1, got {args.n}")
    if args.wait < 0:
        raise ConfigError(f"--wait must be >= 0, got {args.wait:g}")
    setup_logging("worker", args.instance)
    set_title("worker", args.instance)
    os.environ["DUPREP_INSTANCE"] = args.instance      # for apps that open a bus.Replier of their own
    try:
        handler = load_app(args.app)
    except ConfigError as e:
        print(f"duprep worker: {e}", file=sys.stderr)
        return EXIT_BOOT_ERROR
    sched.apply(args.sched)
    # "Cannot attach" (no gateway, every row taken) is 3 for a supervised worker, so that the
    # acceptor halts instead of respawning it in a loop, and 1 for an external one (signals.md).
    try:
        code = bus.serve(handler, instance=args.instance, workers=args.n, wait=args.wait)
    except (BrokenResourceError, InstanceBusyError) as e:
        print(f"duprep worker: {e}", file=sys.stderr)
        return EXIT_BOOT_ERROR if args.supervised else 1
    return 1 if code == EXIT_BOOT_ERROR and not args.supervised else code


def cmd_status(args: argparse.Namespace) -> int:
    from .gateway.child import access_denied
    from .status import render, snapshot, unreadable
    try:
        snap = snapshot(args.instance)
    except ProtocolError as e:          # another duprep's layout, or cut short by a crash
        bad = unreadable(args.instance, e)
        print(json.dumps(bad) if args.json else bad["error"], file=sys.stdout if args.json else sys.stderr)
        return 3
    except FileNotFoundError:
        msg = f"instance {args.instance!r} is not running (no table {ipcnames.table_name(args.instance)})"
        if args.json:
            print(json.dumps({"instance": args.instance, "state": "stopped", "error": msg}))
        else:
            print(msg, file=sys.stderr)
        return 3
    except PermissionError as e:
        raise ConfigError(f"cannot read instance {args.instance!r}: {access_denied(args.instance, e)}") from None
    print(json.dumps(snap, indent=1) if args.json else render(snap, limit=args.limit))
    if snap["state"] == "crashed":        # its objects are left over: not running either
        if not args.json:
            print(snap["error"], file=sys.stderr)
        return 3
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from . import leftovers
    from .lock import InstanceLock
    lock = InstanceLock(args.instance)
    try:
        lock.acquire_gateway(wait_attached=0)
    except InstanceBusyError as e:
        print(f"duprep cleanup: {e}", file=sys.stderr)
        return 1
    removed = leftovers.remove(args.instance)
    lock.unlink()
    lock.close()
    print("removed: " + (", ".join(removed) if removed else "nothing"))
    from .clienthost.instance import crashed
    if crashed(args.instance) is not None:      # a client daemon's leftovers are not a gateway's
        print(f"a crashed client daemon of instance {args.instance!r} left objects too: "
              f"'duprep client-cleanup --instance {args.instance}' removes them", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(clients=args.clients, seconds=args.seconds, workers=args.workers)


def cmd_client_daemon(args: argparse.Namespace) -> int:
    from .clienthost.config import DaemonConfig, default_sizes, parse_server
    from .clienthost.daemon import serve as serve_client_daemon
    host, port = parse_server(args.server)
    sizes = default_sizes()
    cfg = DaemonConfig(
        instance=args.instance, server_host=host, server_port=port, name=args.name or "", links=args.links,
        callback_host=args.callback_host or "", max_backoff=args.max_backoff, late_grace=args.late_grace,
        max_routes=args.max_routes,
        **{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()})
    return serve_client_daemon(cfg)


def cmd_client_status(args: argparse.Namespace) -> int:
    from .clienthost.control import fetch, render
    from .clienthost.instance import crashed
    try:
        snap = fetch(args.instance)
    except DuprepError as e:
        state, error = "stopped", str(e)
        dead = crashed(args.instance)
        if dead is not None:         # it left its queues and files: say so, and how to remove them
            state = "crashed"
            error = (f"the client daemon of instance {args.instance!r} (pid {dead.pid}) crashed: its uplink "
                     f"queue, files and reply queues are left over; start it again or run "
                     f"'duprep client-cleanup --instance {args.instance}' to remove them")
        if args.json:
            print(json.dumps({"instance": args.instance, "state": state, "error": error}))
        else:
            print(f"duprep client-status: {error}", file=sys.stderr)
        return 3
    print(json.dumps(snap, indent=1) if args.json else render(snap))
    return 0


def cmd_client_cleanup(args: argparse.Namespace) -> int:
    from .clienthost.instance import cleanup
    try:
        removed, kept = cleanup(args.instance)
    except InstanceBusyError as e:
        print(f"duprep client-cleanup: {e}", file=sys.stderr)
        return 1
    print("removed: " + (", ".join(removed) if removed else "nothing"))
    if kept:
        print("kept (their local process lives; it removes them itself): " + ", ".join(kept))
    return 0


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each option's help, except where there is no value to show:
    flags, required options, and None (there the help text says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _command(sub: _Commands, name: str, summary: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=summary, formatter_class=_Formatter)


def _add_clienthost_commands(sub: _Commands) -> None:
    cd = _command(sub, "client-daemon", "carry a client host's local processes over one gateway link")
    cd.add_argument("--server", required=True,
                    help="the gateway, HOST:PORT ([v6]:PORT; PORT may be an /etc/services name)")
    cd.add_argument("--instance", default="default", help="names the daemon's queues and files; one daemon each")
    cd.add_argument("--name", default=None, help="client name at the gateway (default: anonymous)")
    cd.add_argument("--links", choices=("direct", "callback"), default="direct",
                    help="direct: one connection; callback: the seed's L0 + connect-back L1/L2")
    cd.add_argument("--callback-host", default=None,
                    help="address to take callbacks on (default: L0's local address)")
    cd.add_argument("--uplink-depth", type=int, default=None,
                    help="messages in the shared uplink queue (default: min(10, fs.mqueue.msg_max), lowered "
                         "to fit 1/8 of RLIMIT_MSGQUEUE)")
    cd.add_argument("--uplink-size", type=int, default=None,
                    help="bytes per uplink message, which bounds a request (default: min(64 KiB, "
                         "fs.mqueue.msgsize_max))")
    cd.add_argument("--reply-depth", type=int, default=None,
                    help="messages per local reply queue (default: min(4, fs.mqueue.msg_max))")
    cd.add_argument("--reply-size", type=int, default=None,
                    help="bytes per reply-queue message; larger replies come in pieces (default: min(1024, "
                         "fs.mqueue.msgsize_max))")
    cd.add_argument("--max-backoff", type=float, default=5.0, help="longest wait between reconnect attempts, seconds")
    cd.add_argument("--late-grace", type=float, default=10.0,
                    help="seconds an unanswered request is remembered after its timeout, so that a late answer "
                         "still reaches its process; then it is forgotten and counted as expired")
    cd.add_argument("--max-routes", type=int, default=100_000,
                    help="unanswered requests remembered at most (also those without a timeout, and deferred "
                         "ones); beyond it the oldest is forgotten, its process told, and counted as forgotten")
    cd.set_defaults(func=cmd_client_daemon)

    cs = _command(sub, "client-status", "show a client daemon's link, local processes and queues")
    cs.add_argument("--instance", default="default", help="the client daemon's instance")
    cs.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    cs.set_defaults(func=cmd_client_status)

    cc = _command(sub, "client-cleanup",
                  "remove the queues and files left by a crashed client daemon (refuses if it is alive)")
    cc.add_argument("--instance", default="default", help="the crashed client daemon's instance")
    cc.set_defaults(func=cmd_client_cleanup)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="duprep", description="A duplicate-server gateway: three processes hold every client's TCP "
        "connection; POSIX message queues carry requests to Python business workers and replies back. "
        "'duprep COMMAND --help' describes each command; README.md and docs/ the rest.")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    s = _command(sub, "serve", "run a gateway in the foreground (systemd style, logs to stderr)")
    s.add_argument("--instance", default="default", help="names the instance's table, queues and lock file")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every IPv4 address)")
    s.add_argument("--port", default="2000", help="port number or /etc/services name (0: any free port)")
    s.add_argument("--workers", type=int, default=2,
                   help="business worker processes the gateway runs and restarts (none with --app none)")
    s.add_argument("--app", default=DEFAULT_APP,
                   help="MODULE:CALLABLE business handler, found with the current directory first on sys.path; "
                        "'none': external workers only")
    s.add_argument("--max-clients", type=int, default=4096,
                   help="connections held at once; more are refused with SERVER_FULL")
    s.add_argument("--max-per-ip", type=int, default=0, help="connections per client IP address (0: no limit)")
    s.add_argument("--queue-depth", type=int, default=None,
                   help="messages per queue (default: what the kernel allows, up to 64)")
    s.add_argument("--queue-size", type=int, default=None,
                   help="bytes per queue message (default: what the kernel allows, up to 64 KiB)")
    s.add_argument("--handshake-timeout", type=float, default=5.0,
                   help="seconds from accept to HELLO before a client is cut off")
    s.add_argument("--max-outbuf", type=int, default=1 << 20,
                   help="reply bytes buffered per client before it is cut off (slow consumer); at least "
                        "64 KiB and twice the queue message size")
    s.add_argument("--write-timeout", type=float, default=30.0,
                   help="seconds a client may leave our writes blocked before it is cut off")
    s.add_argument("--keepalive", type=float, default=60.0,
                   help="seconds without a byte from a client before TCP probes it; a client host that "
                        "vanished without closing is given up after twice the larger of this and "
                        "--write-timeout, idle or not (0: the kernel's settings, 2 hours; at most 32767)")
    s.add_argument("--drain-timeout", type=float, default=10.0,
                   help="seconds a graceful stop waits for queued answers to reach the clients")
    s.add_argument("--heartbeat", type=float, default=30.0,
                   help="seconds between the heartbeats of an idle process (busy ones beat as they work)")
    s.add_argument("--hang-timeout", type=float, default=120.0,
                   help="a gateway process or worker without a heartbeat for this long (a handler stuck, a "
                        "loop spinning, a stopped process) is killed with SIGABRT, its Python traceback "
                        "logged, and replaced; 0: never")
    s.add_argument("--links", choices=("direct", "callback"), default="direct",
                   help="callback: also let client daemons ask to be connected back (the seed's L0/L1/L2; "
                        "only to the address the first connection came from)")
    s.add_argument("--sched", choices=("batch", "other"), default="batch",
                   help="CPU policy of the gateway's processes (batch: no wakeup preemption inside the "
                        "pipeline; see docs/architecture.md)")
    s.set_defaults(func=cmd_serve)

    w = _command(sub, "worker", "run business workers that join a running gateway")
    w.add_argument("--instance", default="default", help="the gateway instance to join")
    w.add_argument("--app", required=True,
                   help="MODULE:CALLABLE, called with a duprep.bus.Request; found with the current directory "
                        "first on sys.path")
    w.add_argument("-n", type=int, default=1,
                   help="worker processes (more than 1: forked and supervised by this process)")
    w.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the gateway to appear")
    w.add_argument("--sched", choices=("batch", "other"), default="batch",
                   help="CPU policy of the workers (as serve --sched)")
    w.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_worker)

    st = _command(sub, "status", "show an instance's connections, processes and queues")
    st.add_argument("--instance", default="default", help="the instance to show")
    st.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    st.add_argument("--limit", type=int, default=50, help="connections shown in text form")
    st.set_defaults(func=cmd_status)

    d = _command(sub, "demo", "run the sample app under simulated clients and report")
    d.add_argument("--clients", type=int, default=20, help="simulated clients, one thread each")
    d.add_argument("--seconds", type=float, default=5.0, help="how long the clients send requests")
    d.add_argument("--workers", type=int, default=2, help="business workers of the demo gateway")
    d.set_defaults(func=cmd_demo)

    c = _command(sub, "cleanup", "remove the IPC objects left by a crashed instance (refuses if it is alive)")
    c.add_argument("--instance", default="default", help="the crashed instance")
    c.set_defaults(func=cmd_cleanup)
    _add_clienthost_commands(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()            # here, so that a closed pipe is reported below
    except ConfigError as e:
        print(f"duprep {args.command}: {e}", file=sys.stderr)
        code = 4
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # The reader went away (`duprep status | head -3`): stop quietly. Python's documented way
        # (signal module, "Note on SIGPIPE"): point stdout at /dev/null so that the flush at exit
        # cannot fail again; 141 is what a process killed by SIGPIPE reports in a shell.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)
