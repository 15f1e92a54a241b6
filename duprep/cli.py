"""``duprep``: a thin command line over the library.

serve   run a gateway in the foreground (systemd style, logs to stderr)
worker  run business workers that join a running gateway
status  show the connection table, processes and queues of an instance
demo    start a gateway with the sample app, drive it with simulated clients, stop it
cleanup remove the IPC objects of an instance whose processes are all dead
client-daemon  hold a client host's link to a gateway for its local processes
client-status  show a client daemon's link, local processes and queues
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from typing import Any, Callable

from . import ipcnames, sched
from .config import DEFAULT_APP, GatewayConfig, resolve_port
from .errors import BrokenResourceError, ConfigError, DuprepError, InstanceBusyError

__all__ = ["main"]


def load_app(spec: str) -> Callable[..., Any]:
    """Import ``MODULE:CALLABLE``."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"--app must be MODULE:CALLABLE, got {spec!r}")
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
    try:
        found = importlib.util.find_spec(module)     # imports parent packages, which may fail in any way
    except Exception as e:
        raise ConfigError(f"cannot find module {module!r} for --app: {e}") from None
    if found is None:
        raise ConfigError(f"cannot find module {module!r} for --app (is it on PYTHONPATH?)")


def cmd_serve(args: argparse.Namespace) -> int:
    from .gateway.acceptor import serve
    cfg = GatewayConfig(
        instance=args.instance, host=args.host, port=resolve_port(args.port), workers=args.workers,
        app=None if args.app == "none" else args.app, max_clients=args.max_clients,
        max_per_ip=args.max_per_ip, queue_depth=args.queue_depth, queue_size=args.queue_size,
        handshake_timeout=args.handshake_timeout, max_outbuf=args.max_outbuf,
        write_timeout=args.write_timeout, drain_timeout=args.drain_timeout, links=args.links,
        sched=args.sched)
    if cfg.app:
        check_app(cfg.app)    # fail here, clearly, rather than in every worker
    return serve(cfg)


def cmd_worker(args: argparse.Namespace) -> int:
    from . import bus
    from .gateway.child import EXIT_BOOT_ERROR, setup_logging, set_title
    setup_logging("worker", args.instance)
    set_title("worker", args.instance)
    try:
        handler = load_app(args.app)
    except ConfigError as e:
        print(f"duprep worker: {e}", file=sys.stderr)
        return EXIT_BOOT_ERROR
    sched.apply(args.sched)
    try:
        return bus.serve(handler, instance=args.instance, workers=args.n, wait=args.wait)
    except (BrokenResourceError, InstanceBusyError) as e:
        print(f"duprep worker: {e}", file=sys.stderr)
        return EXIT_BOOT_ERROR if args.supervised else 1


def cmd_status(args: argparse.Namespace) -> int:
    from .status import render, snapshot
    try:
        snap = snapshot(args.instance)
    except FileNotFoundError:
        msg = f"instance {args.instance!r} is not running (no table {ipcnames.table_name(args.instance)})"
        if args.json:
            print(json.dumps({"instance": args.instance, "state": "stopped", "error": msg}))
        else:
            print(msg, file=sys.stderr)
        return 3
    print(json.dumps(snap, indent=1) if args.json else render(snap, limit=args.limit))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from . import queues
    from .lock import InstanceLock
    from .table import Table
    lock = InstanceLock(args.instance)
    try:
        lock.acquire_gateway(wait_attached=0)
    except InstanceBusyError as e:
        print(f"duprep cleanup: {e}", file=sys.stderr)
        return 1
    names = ipcnames.all_names(args.instance)
    removed = [n for n in (names["requests"], names["replies"]) if queues.unlink(n)]
    try:
        t = Table.attach(names["table"])
        t.close()
        t.unlink()
        removed.append(names["table"])
    except (FileNotFoundError, DuprepError):
        pass
    lock.unlink()
    lock.close()
    print("removed: " + (", ".join(removed) if removed else "nothing"))
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
        callback_host=args.callback_host or "", max_backoff=args.max_backoff,
        **{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()})
    return serve_client_daemon(cfg)


def cmd_client_status(args: argparse.Namespace) -> int:
    from .clienthost.control import fetch, render
    try:
        snap = fetch(args.instance)
    except DuprepError as e:
        if args.json:
            print(json.dumps({"instance": args.instance, "state": "stopped", "error": str(e)}))
        else:
            print(f"duprep client-status: {e}", file=sys.stderr)
        return 3
    print(json.dumps(snap, indent=1) if args.json else render(snap))
    return 0


def _add_clienthost_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    cd = sub.add_parser("client-daemon", help="carry a client host's local processes over one gateway link")
    cd.add_argument("--server", required=True, help="the gateway, HOST:PORT (PORT may be an /etc/services name)")
    cd.add_argument("--instance", default="default", help="names the client host's queues (default: default)")
    cd.add_argument("--name", default=None, help="client name at the gateway (default: anonymous)")
    cd.add_argument("--links", choices=("direct", "callback"), default="direct",
                    help="direct: one connection; callback: the seed's L0 + connect-back L1/L2")
    cd.add_argument("--callback-host", default=None, help="address to take callbacks on (default: L0's local address)")
    cd.add_argument("--uplink-depth", type=int, default=None, help="messages in the shared uplink queue")
    cd.add_argument("--uplink-size", type=int, default=None, help="bytes per uplink message")
    cd.add_argument("--reply-depth", type=int, default=None, help="messages per local reply queue (default 4)")
    cd.add_argument("--reply-size", type=int, default=None,
                    help="bytes per reply-queue message; larger replies come in pieces (default 1024)")
    cd.add_argument("--max-backoff", type=float, default=5.0, help="longest wait between reconnect attempts")
    cd.set_defaults(func=cmd_client_daemon)

    cs = sub.add_parser("client-status", help="show a client daemon's link, local processes and queues")
    cs.add_argument("--instance", default="default")
    cs.add_argument("--json", action="store_true")
    cs.set_defaults(func=cmd_client_status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duprep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a gateway in the foreground")
    s.add_argument("--instance", default="default", help="names the instance's IPC objects (default: default)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", default="2000", help="port number or /etc/services name (0: any free port)")
    s.add_argument("--workers", type=int, default=2, help="business worker processes to run (default 2)")
    s.add_argument("--app", default=DEFAULT_APP,
                   help=f"MODULE:CALLABLE business handler (default {DEFAULT_APP}; 'none': external workers only)")
    s.add_argument("--max-clients", type=int, default=4096)
    s.add_argument("--max-per-ip", type=int, default=0, help="0: no limit")
    s.add_argument("--queue-depth", type=int, default=None, help="messages per queue (default: what the kernel allows)")
    s.add_argument("--queue-size", type=int, default=None, help="bytes per queue message (default: up to 64 KiB)")
    s.add_argument("--handshake-timeout", type=float, default=5.0)
    s.add_argument("--max-outbuf", type=int, default=1 << 20, help="reply bytes buffered per client before it is cut off")
    s.add_argument("--write-timeout", type=float, default=30.0)
    s.add_argument("--drain-timeout", type=float, default=10.0)
    s.add_argument("--links", choices=("direct", "callback"), default="direct",
                   help="callback: also let client daemons ask to be connected back (the seed's L0/L1/L2; "
                        "only to the address the first connection came from)")
    s.add_argument("--sched", choices=("batch", "other"), default="batch",
                   help="CPU policy of the gateway's processes (default batch: no wakeup preemption "
                        "inside the pipeline; see docs/architecture.md)")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run business workers for a running gateway")
    w.add_argument("--instance", default="default")
    w.add_argument("--app", required=True, help="MODULE:CALLABLE, called with a duprep.bus.Request")
    w.add_argument("-n", type=int, default=1, help="worker processes (default 1)")
    w.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the gateway to appear")
    w.add_argument("--sched", choices=("batch", "other"), default="batch",
                   help="CPU policy of the workers (default batch, as the gateway's)")
    w.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    w.set_defaults(func=cmd_worker)

    st = sub.add_parser("status", help="show an instance's connections, processes and queues")
    st.add_argument("--instance", default="default")
    st.add_argument("--json", action="store_true")
    st.add_argument("--limit", type=int, default=50, help="connections shown in text form")
    st.set_defaults(func=cmd_status)

    d = sub.add_parser("demo", help="run the sample app under simulated clients and report")
    d.add_argument("--clients", type=int, default=20)
    d.add_argument("--seconds", type=float, default=5.0)
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("cleanup", help="remove IPC objects left by a crashed instance")
    c.add_argument("--instance", default="default")
    c.set_defaults(func=cmd_cleanup)
    _add_clienthost_commands(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"duprep {args.command}: {e}", file=sys.stderr)
        code = 4
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
