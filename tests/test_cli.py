"""The command line: --app lookup, exit codes, worker supervision (-n > 1), status of a crashed
gateway, help texts, a closed stdout.  Real processes, queues and sockets throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

import duprep
from duprep import cli, ipcnames, queues
from duprep.config import GatewayConfig
from duprep.frame import ErrorCode
from duprep.gateway.acceptor import Acceptor
from duprep.gateway.child import EXIT_BOOT_ERROR, EXIT_CRASH
from duprep.launch import GatewayProcess
from duprep.table import Table

from .conftest import ROOT, alive, comm, descendants, duprep_cli, ipc_leftovers, wait_until

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "duprep")   # what `pip install` made

ECHO_APP = "def handle(request):\n    return b'from-cwd:' + request.data\n"
CRASHY_APP = ("import os\n\ndef handle(request):\n    if request.data == b'crash':\n        os._exit(7)\n"
              "    return request.data\n")


# --- helpers --------------------------------------------------------------------------------------

def attached_workers(instance: str, parent: int, n: int) -> list[int] | None:
    """The pids of ``parent``'s ``n`` live children once each has claimed a worker row, else None."""
    kids = sorted(p for p in descendants(parent) if alive(p))
    if len(kids) != n:
        return None
    table = Table.attach(ipcnames.table_name(instance))
    try:
        rows = {p.pid for p in table.procs() if p.role == "worker"}
    finally:
        table.close()
    return kids if set(kids) <= rows else None


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Factory for command processes (stderr to a file); each is killed with its children afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], *, stderr: Path, cwd: str = ROOT, env: dict[str, str] = ENV) -> subprocess.Popen[bytes]:
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err, cwd=cwd, env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        for pid in [*descendants(proc.pid), proc.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def worker_argv(instance: str, app: str, n: int, *, console_script: bool = False) -> list[str]:
    head = [CONSOLE_SCRIPT] if console_script else [sys.executable, "-m", "duprep"]
    return [*head, "worker", "--instance", instance, "--app", app, "-n", str(n)]


def needs_console_script() -> None:
    if not os.access(CONSOLE_SCRIPT, os.X_OK):
        pytest.skip(f"no console script {CONSOLE_SCRIPT} (duprep not pip-installed here)")


# --- 1. --app from the current directory --------------------------------------------------------

def test_the_readme_worker_line_finds_a_module_in_the_current_directory(
        gateway: Callable[..., GatewayProcess], instance: str, tmp_path: Path,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """README: `duprep worker --app mymodule:handle -n 4`, run where mymodule.py is (console script)."""
    needs_console_script()
    (tmp_path / "mymodule.py").write_text(ECHO_APP)
    gw = gateway(app="none")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = spawn(worker_argv(instance, "mymodule:handle", 2, console_script=True), stderr=tmp_path / "err",
                 cwd=str(tmp_path), env=env)
    wait_until(lambda: attached_workers(instance, proc.pid, 2) or proc.poll() is not None, what="workers")
    assert proc.poll() is None, (tmp_path / "err").read_text()
    with duprep.Client("127.0.0.1", gw.port, timeout=10) as c:
        assert c.request(b"hi") == b"from-cwd:hi"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_load_app_and_check_app_look_in_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"cwd_app_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(ECHO_APP)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    cli.check_app(f"{name}:handle")
    assert sys.path[0] == str(tmp_path)
    assert cli.load_app(f"{name}:handle").__module__ == name
    sys.modules.pop(name, None)
    with pytest.raises(duprep.ConfigError, match="not in the current directory"):
        cli.check_app("no_such_module_here:handle")


def test_supervised_workers_find_the_app_in_the_gateways_directory(
        gateway: Callable[..., GatewayProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gwapp.py").write_text(ECHO_APP)
    monkeypatch.chdir(tmp_path)            # the gateway and its workers inherit it
    gw = gateway(app="gwapp:handle")
    with duprep.Client("127.0.0.1", gw.port, timeout=10) as c:
        assert c.request(b"x") == b"from-cwd:x"


# --- 2. worker options and boot failures --------------------------------------------------------

def test_worker_n_0_is_an_invalid_option() -> None:
    out = duprep_cli("worker", "--app", "tests.apps:handle", "-n", "0")
    assert out.returncode == 4
    assert out.stderr.strip() == "duprep worker: -n must be at least 1, got 0"


def test_workers_without_a_gateway_say_so_in_one_line_each(instance: str) -> None:
    out = duprep_cli("worker", "--instance", instance, "--app", "tests.apps:handle", "-n", "2")
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    said = [line for line in lines if "cannot start: no gateway is running" in line]
    # The first child to fail makes the parent stop the other, which may go before it has said so.
    assert 1 <= len(said) <= 2 and len(lines) == len(said) + 2, out.stderr
    assert "could not start (exit code 3); stopping the other workers" in out.stderr


# --- 3. bus.serve with several workers ----------------------------------------------------------

def test_a_killed_worker_is_reported_replaced_and_counted_in_the_exit_code(
        gateway: Callable[..., GatewayProcess], instance: str, tmp_path: Path,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    gw = gateway(app="none")
    log = tmp_path / "err"
    proc = spawn(worker_argv(instance, "tests.apps:handle", 2), stderr=log)
    first = wait_until(lambda: attached_workers(instance, proc.pid, 2), what="two workers")
    victim = first[0]                                              # type: ignore[index]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (w := attached_workers(instance, proc.pid, 2)) and victim not in w, what="a successor")
    with duprep.Client("127.0.0.1", gw.port, timeout=10) as c:
        assert [c.request(b"%d" % i) for i in range(4)] == [b"0", b"1", b"2", b"3"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL
    text = log.read_text()
    assert f"worker {victim} died (killed by SIGKILL); starting another" in text
    assert text.count("stopped (exit code 0)") == 2 and "Traceback" not in text


def test_workers_that_keep_crashing_are_given_up_on(
        gateway: Callable[..., GatewayProcess], instance: str, tmp_path: Path,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    needs_console_script()
    (tmp_path / "crashy.py").write_text(CRASHY_APP)
    gw = gateway(app="none")
    log = tmp_path / "err"
    proc = spawn(worker_argv(instance, "crashy:handle", 2, console_script=True), stderr=log, cwd=str(tmp_path))
    wait_until(lambda: attached_workers(instance, proc.pid, 2), what="two workers")
    with duprep.Client("127.0.0.1", gw.port, timeout=10) as c:
        for n in range(1, 7):            # one crash at a time: each kills the worker that takes it
            c.send(b"crash")
            wait_until(lambda: log.read_text().count("died (exit code 7)") == n, what=f"crash {n}")
    assert proc.wait(timeout=30) == 7
    text = log.read_text()
    assert text.count("starting another") == 5
    assert "crash 6 within 60 s: giving up" in text


def test_the_supervisor_answers_for_a_worker_whose_row_no_successor_takes(
        gateway: Callable[..., GatewayProcess], instance: str, tmp_path: Path,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """A successor takes the first free row, not necessarily the dead worker's: the parent answers
    what the dead one held with WORKER_LOST itself, as the acceptor does (else the client waits for its
    own timeout, and the gateway's stop for drain_timeout)."""
    (tmp_path / "crashy.py").write_text(CRASHY_APP)
    gw = gateway(app="none")
    log = tmp_path / "err"
    proc = spawn(worker_argv(instance, "crashy:handle", 3), stderr=log, cwd=str(tmp_path))
    kids = wait_until(lambda: attached_workers(instance, proc.pid, 3), what="three workers")
    table = Table.attach(ipcnames.table_name(instance))
    try:
        [lowest] = [p.pid for p in table.procs() if p.role == "worker" and p.pid in kids][:1]   # type: ignore[operator]
    finally:
        table.close()
    os.kill(lowest, signal.SIGTERM)                 # an operator stops one worker: its row is free
    wait_until(lambda: attached_workers(instance, proc.pid, 2), what="two workers left")
    with duprep.Client("127.0.0.1", gw.port, timeout=20) as c:
        with pytest.raises(duprep.RemoteError) as err:
            c.request(b"crash", timeout=10)
        assert err.value.code == ErrorCode.WORKER_LOST
        assert c.request(b"after") == b"after"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7
    assert "answering the requests with ERROR WORKER_LOST" in log.read_text()


def test_a_real_time_signal_is_named_and_no_worker_outlives_its_supervisor(
        gateway: Callable[..., GatewayProcess], instance: str, tmp_path: Path,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    gateway(app="none")
    log = tmp_path / "err"
    proc = spawn(worker_argv(instance, "tests.apps:handle", 2), stderr=log)
    first = wait_until(lambda: attached_workers(instance, proc.pid, 2), what="two workers")
    os.kill(first[0], 40)                    # type: ignore[index]   # not in signal.Signals: once crashed the parent
    wait_until(lambda: "killed by signal 40); starting another" in log.read_text(), what="the replacement")
    kids = wait_until(lambda: attached_workers(instance, proc.pid, 2), what="two workers again")
    os.kill(proc.pid, signal.SIGKILL)        # the supervisor dies: its workers follow (PR_SET_PDEATHSIG)
    wait_until(lambda: not any(alive(k) for k in kids), what="the workers to exit")   # type: ignore[union-attr]


def test_the_supervisor_aborts_a_worker_stuck_in_its_handler_and_replaces_it(
        gateway: Callable[..., GatewayProcess], instance: str, tmp_path: Path,
        spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    """duprep worker -n N applies the gateway's --hang-timeout to its workers, as the acceptor does:
    a handler that never returns gets its worker aborted (traceback logged), the request WORKER_LOST,
    and a successor; the idle worker, beating at the gateway's --heartbeat, is left alone."""
    gw = gateway("--heartbeat", "0.5", "--hang-timeout", "2", app="none")
    log = tmp_path / "err"
    proc = spawn(worker_argv(instance, "tests.apps:handle", 2), stderr=log)
    first = wait_until(lambda: attached_workers(instance, proc.pid, 2), what="two workers")
    with duprep.Client("127.0.0.1", gw.port, timeout=30) as c:
        with pytest.raises(duprep.RemoteError) as err:
            c.request(b"sleep:3600", timeout=30)
        assert err.value.code == ErrorCode.WORKER_LOST
        assert c.request(b"after") == b"after"
    now = wait_until(lambda: attached_workers(instance, proc.pid, 2), what="two workers again")
    assert len(set(first) & set(now)) == 1            # type: ignore[arg-type]   # only the stuck one replaced
    text = log.read_text()
    assert "showed no sign of life" in text and "Fatal Python error: Aborted" in text and "in handle" in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGABRT


def test_a_worker_of_another_duprep_version_halts_the_gateway_with_the_reason(instance: str, tmp_path: Path) -> None:
    """duprep upgraded under a running gateway: a respawned worker runs the new code, whose table layout
    differs.  It used to exit 1, so the acceptor respawned it for ever while requests hung; now it exits
    4 ("cannot boot") and the gateway halts with that code and the reason, once."""
    import re
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "duprep"), tree / "duprep", ignore=shutil.ignore_patterns("__pycache__"))
    log = tmp_path / "err"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "duprep", "serve", "--instance", instance, "--port", "0",
                                 "--workers", "1", "--app", "duprep.apps.echo:handle"], cwd=tree,
                                env=dict(os.environ, PYTHONPATH=str(tree)), stdin=subprocess.DEVNULL, stderr=err)
    try:
        [worker] = wait_until(lambda: [p for p in descendants(proc.pid) if comm(p) == "duprep-worker"]
                              if "ready: accepting" in log.read_text() else None, timeout=30, what="the worker")
        table_py = tree / "duprep" / "table.py"
        table_py.write_text(re.sub(r"LAYOUT_VERSION: Final = (\d+)", lambda m: f"LAYOUT_VERSION: Final = "
                                   f"{int(m.group(1)) + 1}", table_py.read_text()))
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(timeout=60) == 4
    finally:
        for pid in [*descendants(proc.pid), proc.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert "not a duprep table of layout" in text and "restart the gateway" in text
    assert text.count("cannot start") == 1, text
    assert not ipc_leftovers(instance)


# --- 4. status of a gateway killed with SIGKILL -------------------------------------------------

def test_status_reports_a_killed_gateway_as_crashed(gateway: Callable[..., GatewayProcess], instance: str) -> None:
    gw = gateway()
    assert duprep_cli("status", "--instance", instance).returncode == 0
    family = descendants(gw.pid)
    gw.kill()
    wait_until(lambda: not any(alive(p) for p in family), what="the gateway's children to exit")
    out = duprep_cli("status", "--instance", instance)
    assert out.returncode == 3
    assert out.stdout.startswith(f"instance {instance}: crashed on 127.0.0.1:{gw.port}, acceptor pid {gw.pid} gone")
    assert "is not running" in out.stderr and f"'duprep cleanup --instance {instance}'" in out.stderr
    js = duprep_cli("status", "--instance", instance, "--json")
    assert js.returncode == 3
    snap = json.loads(js.stdout)
    assert snap["state"] == "crashed" and "Start the gateway again" in snap["error"]
    assert duprep_cli("cleanup", "--instance", instance).returncode == 0      # the fix it names
    gone = duprep_cli("status", "--instance", instance, "--json")
    assert gone.returncode == 3 and json.loads(gone.stdout)["state"] == "stopped"


def test_a_replier_made_outside_the_main_thread_waits_for_a_booting_gateway(
        gateway: Callable[..., GatewayProcess], instance: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A booting acceptor holds the attach lock exclusively; Replier() waits for it in any thread (it
    used SIGALRM, and raised ValueError outside the main thread)."""
    import threading
    import types
    from duprep import bus, lock
    gw = gateway(workers=0, app="none")
    family = descendants(gw.pid)
    gw.kill()                                       # leaves its table and queues, holds no lock
    wait_until(lambda: not any(alive(p) for p in family), what="the gateway's children to exit")
    code = ("import os, sys\nfrom duprep import ipcnames\nfrom duprep.lock import InstanceLock\n"
            "from duprep.table import Table\nboot = InstanceLock(sys.argv[1])\n"
            "boot.acquire_gateway(wait_attached=10)\n"                               # what Acceptor.boot holds
            "t = Table.attach(ipcnames.table_name(sys.argv[1]))\nt.set('acceptor_pid', os.getpid())\nt.close()\n"
            "print('held', flush=True)\n"
            "sys.stdin.readline()\nboot.share_attach()\nprint('shared', flush=True)\nsys.stdin.read()\n")
    boot = subprocess.Popen([sys.executable, "-c", code, instance], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=ROOT, env=ENV)
    made: dict[str, object] = {}
    waiting = threading.Event()          # set when the thread pauses between two tries for the lock

    def pause(seconds: float) -> None:
        waiting.set()
        time.sleep(seconds)
    monkeypatch.setattr(lock, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=pause), raising=False)

    def make() -> None:
        try:
            made["replier"] = bus.Replier(instance)
        except BaseException as e:
            made["replier"] = e
    t = threading.Thread(target=make)
    try:
        assert boot.stdin is not None and boot.stdout is not None
        assert boot.stdout.readline() == b"held\n"
        t.start()
        wait_until(lambda: waiting.is_set() or made, what="the thread to wait for the attach lock")
        assert not made, made
        boot.stdin.write(b"go\n")                  # set up: attachers may proceed
        boot.stdin.flush()
        assert boot.stdout.readline() == b"shared\n"
        t.join(10)
        replier = made["replier"]
        assert isinstance(replier, bus.Replier), replier
        replier.close()
    finally:
        t.join(10)
        boot.kill()
        boot.wait()
        for f in (boot.stdin, boot.stdout):
            if f is not None:
                f.close()
    assert duprep_cli("cleanup", "--instance", instance).returncode == 0


@pytest.mark.parametrize("content", [b"\x07" * 4096, b""], ids=["another-layout", "empty"])
def test_status_of_a_table_it_cannot_read_says_so_and_names_cleanup(instance: str, content: bytes) -> None:
    """A table of another duprep's layout, or one cut short by a crash while it was created: status
    exits 3 with the reason and the fix, in text and JSON; cleanup removes it."""
    path = os.path.join(ipcnames.SHM_DIR, ipcnames.table_name(instance))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)
    text = duprep_cli("status", "--instance", instance)
    assert text.returncode == 3 and not text.stdout, text
    assert text.stderr.startswith(f"instance {instance!r}: unreadable: ") and "Traceback" not in text.stderr
    assert text.stderr.rstrip().endswith(f"'duprep cleanup --instance {instance}' removes it if no gateway runs")
    js = duprep_cli("status", "--instance", instance, "--json")
    assert js.returncode == 3, js
    snap = json.loads(js.stdout)
    assert snap["state"] == "unreadable" and snap["error"] == text.stderr.rstrip()
    out = duprep_cli("cleanup", "--instance", instance)
    assert out.returncode == 0 and ipcnames.table_name(instance) in out.stdout
    assert not os.path.exists(path)


def test_status_tells_live_process_rows_from_those_of_exited_workers(
        gateway: Callable[..., GatewayProcess], instance: str, tmp_path: Path) -> None:
    """A row keeps its values after its worker exits: 'alive' (the row lock is held) tells them apart."""
    from duprep import bus
    from duprep.status import snapshot
    gateway(workers=1)

    def workers() -> dict[int, bool]:
        return {p["pid"]: p["alive"] for p in snapshot(instance)["processes"] if p["role"] == "worker"}
    [supervised] = wait_until(lambda: [pid for pid, up in workers().items() if up], what="the supervised worker")
    code = "import sys\nfrom duprep import bus\nw = bus.Worker(sys.argv[1])\nprint('up', flush=True)\nsys.stdin.read()\n"
    with bus.Worker(instance):                      # an external worker that comes and goes (row 4)...
        assert workers()[os.getpid()] is True
        with open(tmp_path / "err", "wb") as err:   # ...and one killed (row 5)
            killed = subprocess.Popen([sys.executable, "-c", code, instance], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=err, cwd=ROOT, env=ENV)
        try:
            assert killed.stdout is not None and killed.stdout.readline() == b"up\n"
            assert workers()[killed.pid] is True
        finally:
            killed.kill()
            killed.wait()
            killed.stdout.close()
            killed.stdin.close()
    assert workers() == {supervised: True, os.getpid(): False, killed.pid: False}
    snap = json.loads(duprep_cli("status", "--instance", instance, "--json").stdout)
    assert all(p["alive"] for p in snap["processes"] if p["role"] != "worker")
    lines = duprep_cli("status", "--instance", instance).stdout.splitlines()
    for pid, up in ((supervised, True), (os.getpid(), False), (killed.pid, False)):
        [line] = [x for x in lines if x.startswith("worker") and x.split()[1] == str(pid)]
        assert line.split()[3] == ("alive" if up else "exited"), line


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_status_sees_a_gateway_in_another_pid_namespace_as_running(instance: str) -> None:
    """Liveness comes from the kernel's lock table, not from a pid that means another process here
    (a container sharing /dev/shm, systemd PrivatePIDs=): the acceptor is pid 1 in its namespace."""
    ns = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-m", "duprep", "serve", "--instance",
                           instance, "--port", "0", "--app", "none"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: duprep_cli("status", "--instance", instance).returncode == 0, timeout=30,
                   what="the namespaced gateway to be ready")
        snap = json.loads(duprep_cli("status", "--instance", instance, "--json").stdout)
        assert snap["state"] == "ready" and snap["acceptor_pid"] == 1
    finally:
        for pid in descendants(ns.pid)[:1]:        # the acceptor (the namespace's pid 1): a graceful stop
            os.kill(pid, signal.SIGTERM)
        try:
            ns.wait(30)
        finally:
            if ns.poll() is None:
                ns.kill()
                ns.wait()


# --- 5. the acceptor's exit code after a crash ----------------------------------------------------

@pytest.mark.parametrize("state, code", [("booting", EXIT_BOOT_ERROR), ("ready", EXIT_CRASH)])
def test_an_acceptor_crash_exits_3_before_ready_and_1_after(instance: str, state: str, code: int) -> None:
    """3 tells systemd (RestartPreventExitStatus) "cannot boot"; 1 "crashed, restart it"."""
    acceptor = Acceptor(GatewayConfig(instance=instance))

    def boot() -> None:
        acceptor.state = state

    def crash() -> None:
        raise RuntimeError("a bug in the event loop")

    acceptor.boot = boot                    # type: ignore[method-assign]
    acceptor.loop.run = crash               # type: ignore[method-assign]
    assert acceptor.run() == code


# --- 6. a worker of another user --------------------------------------------------------------------

def test_a_worker_that_may_not_open_the_table_says_whose_it_is(
        gateway: Callable[..., GatewayProcess], instance: str) -> None:
    """As root without CAP_DAC_OVERRIDE, a table owned by nobody is what another user's worker meets."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    gateway(app="none")
    table = "/dev/shm/" + ipcnames.table_name(instance)
    os.chown(table, 65534, -1)
    try:
        for n in ("1", "2"):
            out = subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                                  "duprep", "worker", "--instance", instance, "--app", "tests.apps:handle", "-n", n],
                                 capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
            assert out.returncode == 4, out.stderr
            assert "Traceback" not in out.stderr
            assert f"{table} belongs to" in out.stderr and "(uid 65534, mode 0600)" in out.stderr
            assert "the gateway's user" in out.stderr
    finally:
        os.chown(table, 0, -1)


# --- 8. client-host commands ------------------------------------------------------------------------

def test_client_daemon_exit_codes(instance: str) -> None:
    from duprep.clienthost.launch import start_daemon
    assert duprep_cli("client-daemon", "--instance", instance, "--server", "no-port").returncode == 4
    deep = duprep_cli("client-daemon", "--instance", instance, "--server", "127.0.0.1:1",
                      "--uplink-depth", str(queues.kernel_limits().msg_max + 1))
    assert deep.returncode == 6 and "fs.mqueue.msg_max" in deep.stderr
    assert duprep_cli("client-status", "--instance", instance).returncode == 3
    daemon = start_daemon(instance, "127.0.0.1:1", env=ENV, stderr=subprocess.DEVNULL)
    try:
        assert duprep_cli("client-daemon", "--instance", instance, "--server", "127.0.0.1:1").returncode == 5
        assert duprep_cli("client-status", "--instance", instance).returncode == 0
    finally:
        assert daemon.stop(timeout=20) == 0
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"duprep-ch.{instance}.")]
    assert not left and not queues.unlink(ipcnames.clienthost_uplink(instance))


# --- 9. help texts ------------------------------------------------------------------------------------

def test_every_option_has_help_with_its_default() -> None:
    import argparse

    def shown(action: argparse.Action) -> bool:       # None and flags have no default worth printing
        return action.default is not None and action.default is not False and not action.required

    parser = cli.build_parser()
    top = parser.format_help()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert top.count(f" {name} ") + top.count(f" {name}\n") == 1, f"{name} not listed exactly once"
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            if shown(action):
                assert f"(default: {action.default})" in text, (name, action.dest)
                assert "default" not in action.help, f"{name} {action.dest}: the default twice"
    serve = " ".join(commands.choices["serve"].format_help().split())
    for option in ("--host HOST", "--write-timeout", "--drain-timeout", "--max-outbuf", "--handshake-timeout"):
        assert option in serve
    assert "(default: 0.0)" in " ".join(commands.choices["worker"].format_help().split())     # --wait


# --- 10. a reader that goes away --------------------------------------------------------------------

def test_a_closed_stdout_ends_quietly(instance: str) -> None:
    r, w = os.pipe()
    os.close(r)                          # `| head -3` that has already exited
    try:
        out = subprocess.run([sys.executable, "-m", "duprep", "status", "--instance", instance, "--json"],
                             stdout=w, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=30)
    finally:
        os.close(w)
    assert out.returncode == 141 and out.stderr == ""


# --- 11. systemd: socket activation, sd_notify, the watchdog -----------------------------------------

def _as_systemd(instance: str, listener: socket.socket, notify: str, *args: str) -> subprocess.Popen[bytes]:
    """``duprep serve`` started as systemd does it: the socket at fd 3, LISTEN_PID/LISTEN_FDS for the
    exec'd process, NOTIFY_SOCKET, WATCHDOG_USEC (1 s)."""
    fd = listener.fileno()
    script = f'exec 3<&{fd} {fd}<&-; export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@"'
    env = dict(ENV, NOTIFY_SOCKET=notify, WATCHDOG_USEC="1000000")
    return subprocess.Popen(["bash", "-c", script, "bash", sys.executable, "-m", "duprep", "serve",
                             "--instance", instance, "--port", "1", *args],
                            pass_fds=(fd,), env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_socket_activation_notify_and_watchdog(instance: str, tmp_path: Path) -> None:
    """The socket systemd passes is the one served (--port ignored; status shows its address), READY=1
    comes once the gateway accepts, WATCHDOG=1 every half WatchdogSec, STOPPING=1 at SIGTERM."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    proc = _as_systemd(instance, listener, str(tmp_path / "notify"), "--workers", "1", "--app", "tests.apps:handle")
    listener.close()
    try:
        while (msg := notify.recv(4096)) == b"WATCHDOG=1":     # (pinged from the start of the boot)
            pass
        assert msg == b"READY=1"
        with duprep.Client("127.0.0.1", port, timeout=20) as c:
            assert c.request(b"through fd 3") == b"through fd 3"
        for pid in descendants(proc.pid):            # the watchdog and the socket were the acceptor's only
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            assert b"WATCHDOG_USEC=" not in env and b"LISTEN_FDS=" not in env, pid
        table = Table.attach(ipcnames.table_name(instance))
        try:
            assert (table.get("port"), table.header()["host"]) == (port, "127.0.0.1")
        finally:
            table.close()
        pets = 0
        deadline = time.monotonic() + 5
        while pets < 3 and time.monotonic() < deadline:
            assert notify.recv(4096) == b"WATCHDOG=1"
            pets += 1
        assert pets == 3
        proc.send_signal(signal.SIGTERM)
        while (msg := notify.recv(4096)) == b"WATCHDOG=1":
            pass
        assert msg == b"STOPPING=1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            for pid in [*descendants(proc.pid), proc.pid]:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        notify.close()


def test_a_passed_socket_that_is_not_a_tcp_listener_stops_the_boot_with_a_reason(instance: str,
                                                                                 tmp_path: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    proc = _as_systemd(instance, udp, str(tmp_path / "nobody"), "--workers", "0")
    udp.close()
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 4, err
    assert b"not a listening TCP socket" in err and b"ListenStream=" in err
    assert not ipc_leftovers(instance)


def test_serve_options_default_to_the_gateway_configs_defaults() -> None:
    """`duprep serve` and GatewayConfig (the library's way to a gateway) must not drift apart."""
    import argparse
    import msgspec
    serve = next(a for a in cli.build_parser()._actions
                 if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    fields = {f.name: f.default for f in msgspec.structs.fields(GatewayConfig)}
    checked = 0
    for action in serve._actions:
        if action.dest in fields:
            default = int(action.default) if action.dest == "port" else action.default
            assert default == fields[action.dest], action.dest
            checked += 1
    assert checked >= 18
