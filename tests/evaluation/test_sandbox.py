"""The sandbox really runs programs and really contains them.

Every escape below runs under each layer configuration this machine can run: all layers, the kernel
layers (namespaces + seccomp) without the audit hook, and the audit hook alone (only with
``unsafe_without`` naming the kernel layers it lacks). After each run the test checks, itself, that
nothing outside the scratch directory changed (canary files), that no connection reached a loopback
listener it started, that no process of the run is still alive, that an unrelated process it started
lives, and that it (the evaluating parent) received no signal. A control runs the same programs without
any sandbox and sees them escape, so the programs are real escapes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import pytest

from blt_decode.evaluation import sandbox
from blt_decode.evaluation.sandbox import SandboxConfig, SandboxError, run_program

MISSING = sandbox.missing_layers()
#: device nodes of this machine that a program must not open for writing (a read-only mount does not stop
#: writes to a device node): disks, loop devices, consoles, the kernel log
DEVICES = [d for d in ("/dev/kmsg", "/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop0", "/dev/tty1", "/dev/console",
                       "/dev/mem", "/dev/kvm", "/dev/fuse") if os.path.exists(d)]
#: everything this machine has; what it lacks is accepted (for the tests of limits, not of containment)
AVAILABLE = SandboxConfig(timeout_s=5, unsafe_without=frozenset(MISSING))
FULL = SandboxConfig(timeout_s=5)
KERNEL = SandboxConfig(timeout_s=5, audit_hook=False)
HOOK_ONLY = SandboxConfig(timeout_s=5, namespaces=False, seccomp=False, unsafe_without="namespaces,seccomp")

needs_kernel = pytest.mark.skipif(bool(MISSING), reason=f"kernel layers missing here: {MISSING}")
CONFIGS = [pytest.param(FULL, marks=needs_kernel, id="all-layers"),
           pytest.param(KERNEL, marks=needs_kernel, id="kernel-layers-without-hook"),
           pytest.param(HOOK_ONLY, id="audit-hook-alone-unsafe"),
           # where a kernel layer is missing: whatever the machine has, as --unsafe-sandbox runs it
           pytest.param(AVAILABLE, marks=pytest.mark.skipif(not MISSING, reason="no layer missing here"),
                        id="the-layers-this-machine-has")]


# -- the world outside the sandbox ------------------------------------------------------------------------
class _Listener:
    """A TCP server on loopback (or, given a path, a unix socket server there) that records whether
    anybody connected."""

    def __init__(self, path: str | None = None):
        self.path = path

    def __enter__(self):
        self.sock = socket.socket(socket.AF_UNIX) if self.path else socket.socket()
        self.sock.bind(self.path or ("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = None if self.path else self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return self

    def _accept(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.sock.close()


def _processes_with(marker: bytes) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


@attrs.define
class World:
    outside: Path
    canary: Path
    listener: _Listener
    unix_listener: _Listener
    victim: subprocess.Popen
    marker: str
    signals: list

    def header(self) -> str:
        """Constants the escape programs use."""
        return (f"OUT = {str(self.outside)!r}\nPORT = {self.listener.port}\nPARENT = {os.getpid()}\n"
                f"VICTIM = {self.victim.pid}\nMARK = {self.marker!r}\nDEVICES = {DEVICES!r}\n"
                f"UNIX_SOCKET = {self.unix_listener.path!r}\n"
                "import os\nprint('SCRATCH=' + os.getcwd(), flush=True)\n")

    def survivors(self, result) -> list[int]:
        scratch = next((line.split("=", 1)[1] for line in result.stdout.splitlines() if line.startswith("SCRATCH=")), None)
        markers = [self.marker.encode()] + ([scratch.encode()] if scratch else [])
        return sorted({pid for m in markers for pid in _processes_with(m)})

    def assert_contained(self, result) -> None:
        left = self.survivors(result)
        for pid in left:  # a failing run leaves nothing behind either
            os.kill(pid, signal.SIGKILL)
        assert left == [], result
        assert sorted(p.name for p in self.outside.iterdir()) == ["canary.txt"], (list(self.outside.iterdir()), result)
        assert self.canary.read_text() == "original"
        assert "user.escape" not in os.listxattr(self.canary)
        assert self.listener.connections == 0 and self.unix_listener.connections == 0, result
        with pytest.raises(subprocess.TimeoutExpired):  # the unrelated process lives
            self.victim.wait(timeout=0.5)
        assert self.signals == [], "the evaluating parent was signalled"
        assert "READ" not in result.stdout, result


@pytest.fixture
def world(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary.txt"
    canary.write_text("original")
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(signal.SIGUSR1))
    previous_io = signal.signal(signal.SIGIO, lambda *_: received.append(signal.SIGIO))
    victim = subprocess.Popen(["sleep", "600"], start_new_session=True)
    marker = f"{int.from_bytes(os.urandom(4), 'big') % 10**6 + 10**6}.{os.getpid()}"  # a unique sleep length
    try:
        with _Listener() as listener, _Listener(str(tmp_path / "unix.sock")) as unix_listener:
            yield World(outside, canary, listener, unix_listener, victim, marker, received)
    finally:
        victim.kill()
        victim.wait()
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGIO, previous_io)
        for pid in _processes_with(marker.encode()):  # only ever non-empty in the control
            os.kill(pid, signal.SIGKILL)


# -- the escapes ------------------------------------------------------------------------------------------
def _attempt(*lines: str) -> str:
    """Each line tried on its own: a refusal does not stop the next attempt."""
    return "".join(f"try:\n    {line}\nexcept BaseException as exc:\n    print('refused:', repr(exc))\n" for line in lines)


_FORK_CHILD = ("    try:\n        os.execv('/bin/sleep', ['sleep', MARK])\n    except BaseException:\n        pass\n"
               "    import time\n    while True:\n        time.sleep(1)\n")
#: programs that leave a process behind if they can (run to a pass, and to the wall-clock limit)
SURVIVORS = {
    "fork_exec": (  # _posixsubprocess raises no audit event; call_setsid=True; allow_vfork where it exists
        "def fork_exec():\n    import _posixsubprocess\n    r, w = os.pipe()\n"
        "    args = [[b'sleep', MARK.encode()], [b'/bin/sleep'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, "
        "True, True, -1, None, None, None, -1, None]\n"
        "    try:\n        return _posixsubprocess.fork_exec(*args, True)\n"
        "    except TypeError:\n        return _posixsubprocess.fork_exec(*args)\n"
        + _attempt("fork_exec()")),
    "os_fork_new_session": "try:\n    pid = os.fork()\nexcept BaseException as exc:\n    pid = None\n    print(repr(exc))\n"
                           "if pid == 0:\n    os.setsid()\n" + _FORK_CHILD,
    "os_fork_same_group": "try:\n    pid = os.fork()\nexcept BaseException as exc:\n    pid = None\n    print(repr(exc))\n"
                          "if pid == 0:\n" + _FORK_CHILD,
    "popen_new_session": _attempt("import subprocess; subprocess.Popen(['sleep', MARK], start_new_session=True)"),
    "popen_same_group": _attempt("import subprocess; subprocess.Popen(['sleep', MARK])"),
}
#: programs that try to reach outside: files, processes, the network, the parent's secrets
#: (the control below runs some of them with no sandbox at all, as this user: never a broadcast signal
#: such as kill(-1), only the victim and the parent this test owns)
ESCAPES = {
    "pidfd_signal_parent": _attempt("import signal; signal.pidfd_send_signal(os.pidfd_open(PARENT), signal.SIGUSR1)",
                                    "import signal; os.kill(PARENT, signal.SIGUSR1)"),
    "sigio_to_parent": (  # a signal without kill(): the kernel sends SIGIO/the F_SETSIG signal to the owner
        "import fcntl, signal\nr, w = os.pipe()\n"
        + _attempt("fcntl.fcntl(r, fcntl.F_SETOWN, PARENT)", "fcntl.fcntl(r, 10, signal.SIGUSR1)",
                   "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC); os.write(w, b'x')")),
    "kill_unrelated_process": _attempt("import signal; signal.pidfd_send_signal(os.pidfd_open(VICTIM), signal.SIGKILL)",
                                       "os.kill(VICTIM, 9)", "os.killpg(VICTIM, 9)"),
    "switch_hook_off_then_write": _attempt(
        "import __main__; [v.clear() for v in list(vars(__main__).values()) if isinstance(v, (dict, list, set))]",
        "import gc; [o.append(1) for o in gc.get_objects() if type(o) is list and not o]",
        "import gc; [o.clear() for o in gc.get_objects() if type(o) is set]",
        "open(OUT + '/canary.txt', 'w').write('escaped')",
        "import socket; socket.create_connection(('127.0.0.1', PORT), timeout=2)"),
    "dir_fd_dotdot_after_chdir": (
        "fd = os.open('.', os.O_RDONLY)\nrel = os.path.relpath(OUT + '/escaped.txt', os.getcwd())\n"
        # mode -1: an old hook took any integer but -1 for a dir_fd, refusing makedirs
        "for _ in range(40):\n    os.mkdir('d', -1)\n    os.chdir('d')\n"
        + _attempt("os.close(os.open(rel, os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
                   "os.mkdir(rel + '.dir', dir_fd=fd)", "os.symlink('/', 'root'); open('root' + OUT + '/via-link', 'w')")),
    "mkfifo_outside": _attempt("os.mkfifo(OUT + '/fifo')"),
    "mknod_outside": _attempt("import stat; os.mknod(OUT + '/node', 0o600 | stat.S_IFREG)"),
    "setxattr_outside": _attempt("os.setxattr(OUT + '/canary.txt', 'user.escape', b'1')"),
    "read_parent_environ": _attempt("data = open('/proc/%d/environ' % PARENT, 'rb').read(); print('READ', len(data))"),
    "socket_connect": _attempt("import socket; socket.create_connection(('127.0.0.1', PORT), timeout=2)",
                               "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                               "s.sendto(b'x', ('127.0.0.1', PORT))"),
    "open_device_nodes": "for dev in DEVICES:\n" + "".join(
        "    " + line + "\n" for line in _attempt("os.close(os.open(dev, os.O_WRONLY | os.O_NONBLOCK)); print('OPENED', dev)"
                                                  ).splitlines()),
    "unix_socket_connect": _attempt(  # a socket file of the machine (think docker.sock, dbus)
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect(UNIX_SOCKET)",
        "import socket; a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM); a.connect(UNIX_SOCKET)",
        "import socket; a, b = socket.socketpair(); a.connect(UNIX_SOCKET)"),
    "write_outside": _attempt("open(OUT + '/canary.txt', 'w').write('escaped')", "open(OUT + '/new.txt', 'w')",
                              "os.rename('inside.txt', OUT + '/moved.txt')"),
}


@pytest.mark.parametrize("how", sorted(SURVIVORS))
@pytest.mark.parametrize("ending", ["passing", "timed_out"])
@pytest.mark.parametrize("config", CONFIGS)
def test_no_process_outlives_a_run(world, config, how, ending):
    tail = "print('done')\n" if ending == "passing" else "while True:\n    pass\n"
    if ending == "timed_out":
        config = attrs.evolve(config, timeout_s=1)
    result = run_program(world.header() + SURVIVORS[how] + tail, config)
    assert result.status == ending.replace("passing", "passed"), result
    world.assert_contained(result)


@pytest.mark.parametrize("how", sorted(ESCAPES))
@pytest.mark.parametrize("config", CONFIGS)
def test_escapes_are_contained(world, config, how):
    result = run_program(world.header() + ESCAPES[how], config)
    time.sleep(0.2)  # a connection or a signal in flight would land by now (the checks then see it)
    world.assert_contained(result)


@pytest.mark.parametrize("how", ["fork_exec", "kill_unrelated_process", "pidfd_signal_parent", "sigio_to_parent",
                                 "dir_fd_dotdot_after_chdir", "read_parent_environ", "setxattr_outside"])
def test_the_escapes_escape_without_a_sandbox(world, tmp_path, how):
    """The control: the same programs, run by a bare python, do what the sandbox stops."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    program = world.header() + {**SURVIVORS, **ESCAPES}[how]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:  # files: a survivor keeps them open
        subprocess.run([sys.executable, "-c", program], cwd=scratch, stdout=out, stderr=err, timeout=30)
    run = attrs.make_class("Run", ["stdout", "stderr"])((tmp_path / "out").read_text(), (tmp_path / "err").read_text())
    time.sleep(0.2)
    escaped = {
        "fork_exec": lambda: _processes_with(world.marker.encode()) != [],
        "kill_unrelated_process": lambda: world.victim.wait(timeout=5) is not None,
        "pidfd_signal_parent": lambda: world.signals != [],
        "sigio_to_parent": lambda: world.signals != [],
        "dir_fd_dotdot_after_chdir": lambda: (world.outside / "escaped.txt").exists(),
        "read_parent_environ": lambda: "READ" in run.stdout,
        "setxattr_outside": lambda: "user.escape" in os.listxattr(world.canary),
    }[how]
    assert escaped(), (run.stdout, run.stderr)


@pytest.mark.parametrize("config", CONFIGS)
def test_scratch_has_a_total_size(world, config):
    program = world.header() + "for i in range(10):\n    open(f'f{i}', 'wb').write(b'x' * (15 << 20))\n"
    result = run_program(program, config)
    assert result.status == "failed", result
    assert "No space left on device" in result.stderr or "scratch directory is full" in result.stderr, result.stderr
    world.assert_contained(result)
    small = attrs.evolve(config, scratch_mb=8)
    assert run_program("open('a', 'wb').write(b'x' * (6 << 20))\n", small).passed
    assert not run_program("open('a', 'wb').write(b'x' * (6 << 20))\nopen('b', 'wb').write(b'x' * (6 << 20))\n"
                           "open('c', 'wb').write(b'x')\n", small).passed


@pytest.mark.parametrize("config", [pytest.param(FULL, marks=needs_kernel, id="all-layers"),
                                    pytest.param(KERNEL, marks=needs_kernel, id="kernel-layers-without-hook")])
def test_home_directories_are_hidden(config):
    """The program's user may read its home (root's, or yours under --map-root-user): the namespace hides
    /root and /home, but for the interpreter's installation."""
    home = Path.home()
    if not str(home).startswith(("/root/", "/home/")) and str(home) != "/root":
        pytest.skip(f"the home directory {home} is neither under /root nor /home")
    secret = home / f".blt-sandbox-secret-{os.getpid()}"
    secret.write_text("s3cr3t-token")
    try:
        result = run_program(f"print('READ', open({str(secret)!r}).read())\n", config)
    finally:
        secret.unlink()
    assert result.status == "failed" and "s3cr3t" not in result.stdout + result.stderr, result
    assert "FileNotFoundError" in result.stderr, result


# -- what must keep working -------------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS)
def test_ordinary_file_work_and_threads_run(config):
    program = ("import os, threading\nos.makedirs('a/b')\nopen('a/b/x', 'w').write('1')\nos.chmod('a/b/x', 0o600)\n"
               "os.chmod('a', 0o700)\nos.rename('a/b/x', 'a/y')\nos.remove('a/y')\nos.rmdir('a/b')\n"
               "box = []\nthreads = [threading.Thread(target=box.append, args=(i,)) for i in range(4)]\n"
               "[t.start() for t in threads]\n[t.join() for t in threads]\nassert sorted(box) == [0, 1, 2, 3]\n"
               "print('ok')\n")
    result = run_program(program, config)
    assert result.passed and result.stdout.strip() == "ok", result


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('checked')\n", AVAILABLE)
    assert ok.passed and ok.returncode == 0 and ok.stdout.strip() == "checked" and ok.ended == "exit status 0"
    wrong = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", AVAILABLE)
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr and wrong.ended == "exception AssertionError"


def test_an_early_exit_does_not_pass():
    # exit status 0, but the program never reached its end: the pass token was not printed
    early = run_program("import sys\nsys.exit(0)\nassert False\n", AVAILABLE)
    assert early.returncode == 0 and early.status == "failed"


def test_an_infinite_loop_is_stopped_at_the_time_limit():
    started = time.perf_counter()
    result = run_program("while True:\n    pass\n", attrs.evolve(AVAILABLE, timeout_s=1))
    assert result.status == "timed_out" and not result.passed and result.ended == "wall-clock limit"
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("config", CONFIGS)
def test_out_of_memory_is_how_it_died_not_what_it_printed(config):
    started = time.perf_counter()
    real = run_program("block = bytearray(10 * 10**9)\n", config)
    assert real.status == "out_of_memory" and "MemoryError" in real.stderr, real
    assert time.perf_counter() - started < 10  # refused at once, never allocated
    fake = run_program("raise AssertionError('expected 3, got MemoryError: out of memory')\n", config)
    assert fake.status == "failed" and fake.ended == "exception AssertionError", fake
    printed = run_program("import sys\nprint('MemoryError', file=sys.stderr)\nsys.exit(1)\n", config)
    assert printed.status == "failed", printed


def test_a_signal_death_is_reported_as_such():
    result = run_program("import os, signal\nsignal.signal(signal.SIGSEGV, signal.SIG_DFL)\n"
                         "os.kill(os.getpid(), signal.SIGSEGV)\n", attrs.evolve(AVAILABLE, audit_hook=False))
    assert result.status == "failed" and result.ended == "signal SIGSEGV", result


def test_the_scratch_directory_is_removed_afterwards():
    result = run_program("import os\nopen('notes.txt', 'w').write('kept?')\nprint(os.getcwd())\n", AVAILABLE)
    assert result.passed, result
    assert not Path(result.stdout.strip()).exists()


# -- layers: reported, and refused when missing -----------------------------------------------------------
def test_isolation_reports_each_layer():
    text = sandbox.isolation(AVAILABLE)
    assert "RLIMIT_AS 1024 MiB" in text and "scratch 64 MiB" in text and "RLIMIT_NPROC" in text
    for layer in ("namespaces:", "seccomp:", "audit hook:"):
        assert layer in text
    off = sandbox.isolation(HOOK_ONLY)
    assert "namespaces: OFF (switched off)" in off and "seccomp: OFF (switched off)" in off
    assert "audit hook: off" in sandbox.isolation(attrs.evolve(AVAILABLE, audit_hook=False))


def test_switching_a_kernel_layer_off_needs_unsafe_without():
    with pytest.raises(SandboxError, match=r"namespaces=False .* unsafe_without \(--unsafe-sandbox namespaces\)"):
        SandboxConfig(namespaces=False)
    with pytest.raises(SandboxError, match="seccomp=False"):
        SandboxConfig(seccomp=False, unsafe_without={"namespaces"})
    with pytest.raises(SandboxError, match="unknown sandbox layer 'audit_hook'"):
        SandboxConfig(unsafe_without="audit_hook")


_RUN_BARE = ("import sys\nfrom blt_decode.evaluation import sandbox\n"
             "try:\n    r = sandbox.run_program('print(1)', sandbox.SandboxConfig(unsafe_without=sys.argv[1]))\n"
             "except sandbox.SandboxError as exc:\n    print('REFUSED', exc)\nelse:\n    print(r.status)\n")


def test_a_machine_without_a_layer_refuses_unless_it_is_named(tmp_path):
    """A machine without unshare (a PATH without it): no run unless unsafe_without names namespaces."""
    bare = {"PATH": str(tmp_path), "LANG": "C.UTF-8", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    refused = subprocess.run([sys.executable, "-c", _RUN_BARE, ""], env=bare, capture_output=True, text=True, timeout=60)
    assert refused.stdout.startswith("REFUSED the sandbox lacks namespaces"), refused
    assert "--unsafe-sandbox namespaces" in refused.stdout and "not found" in refused.stdout
    allowed = subprocess.run([sys.executable, "-c", _RUN_BARE, "namespaces"], env=bare, capture_output=True, text=True,
                             timeout=60)
    assert allowed.stdout.strip() == "passed", allowed
    assert allowed.stderr.count("without the sandbox's namespaces layer") == 1, allowed.stderr


@pytest.mark.parametrize("value,words", [("seccomp", "--unsafe-sandbox names seccomp, which this machine has"),
                                         ("audit-hook", "--unsafe-sandbox: expected comma-separated layer names"),
                                         (",", "--unsafe-sandbox: expected comma-separated layer names")])
def test_the_command_refuses_a_bad_unsafe_flag(tmp_path, capsys, value, words):
    from blt_decode.cli import main

    if "seccomp" in MISSING:
        pytest.skip("seccomp is missing here")
    rc = main(["eval", "humaneval", "--model", "random:tiny", "--limit", "1", "--output", str(tmp_path / "he.jsonl"),
               "--unsafe-sandbox", value])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "he.jsonl").exists()


def test_the_command_refuses_a_missing_layer_unless_flagged(tmp_path):
    bare = {"PATH": str(tmp_path), "LANG": "C.UTF-8", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cli = "import sys\nfrom blt_decode.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    args = ["eval", "humaneval", "--model", "random:tiny", "--limit", "1", "--max-new-bytes", "4",
            "--strategies", "ar", "--output", str(tmp_path / "he.jsonl")]
    refused = subprocess.run([sys.executable, "-c", cli, *args], env=bare, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--unsafe-sandbox namespaces" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and not (tmp_path / "he.jsonl").exists()
    allowed = subprocess.run([sys.executable, "-c", cli, *args, "--unsafe-sandbox", "namespaces"], env=bare,
                             capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "namespaces: OFF (unavailable here" in allowed.stderr and "namespaces: OFF" in (tmp_path / "he.jsonl").read_text()


@pytest.mark.parametrize("kwargs,words", [({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("nan")}, "timeout_s"),
                                          ({"memory_mb": 10}, "memory_mb"), ({"memory_mb": True}, "memory_mb"),
                                          ({"max_file_mb": 0}, "max_file_mb"), ({"scratch_mb": 0}, "scratch_mb"),
                                          ({"scratch_mb": 10**6}, "scratch_mb")])
def test_bad_limits_are_refused(kwargs, words):
    with pytest.raises(SandboxError, match=words):
        SandboxConfig(**kwargs)


# -- the filter itself, on both architectures -------------------------------------------------------------
def _guard_namespace() -> dict:
    namespace: dict = {}
    exec(sandbox._GUARD.replace("\nmain()\n", "\n"), namespace)
    return namespace


def _run_bpf(prog, arch: int, nr: int, arg0: int = 0, arg1: int = 0) -> int:
    """A classic-BPF interpreter for the instructions the guard emits, over one struct seccomp_data."""
    data = {0: nr, 4: arch, 16: arg0 & 0xFFFFFFFF, 24: arg1 & 0xFFFFFFFF}
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc = data.get(k, 0)
        elif code == 0x54:
            acc &= k
        elif code == 0x06:
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_seccomp_filter_on_each_architecture(machine):
    guard = _guard_namespace()
    prog, arch = guard["_filter"](), guard["_ARCH"][machine]
    column = 0 if machine == "x86_64" else 1
    nr = {name: nrs[column] for name, nrs in guard["_NR"].items()}
    allow, eperm, enosys = 0x7FFF0000, 0x00050001, 0x00050026
    thread_flags = 0x3D0F00  # glibc's pthread_create
    assert _run_bpf(prog, arch, nr["clone"], thread_flags) == allow
    assert _run_bpf(prog, arch, nr["clone"], 0x01200011) == eperm  # glibc's fork: SIGCHLD|CHILD_SETTID|CLEARTID
    assert _run_bpf(prog, arch, nr["clone"], thread_flags | 0x40000000) == eperm  # a thread in a new netns
    assert _run_bpf(prog, arch, nr["clone3"]) == enosys
    assert _run_bpf(prog, arch, nr["fcntl"], 3, 8) == eperm and _run_bpf(prog, arch, nr["fcntl"], 3, 10) == eperm
    assert _run_bpf(prog, arch, nr["fcntl"], 3, 1) == allow  # F_GETFD
    assert _run_bpf(prog, arch, nr["ioctl"], 0, 0x5412) == eperm and _run_bpf(prog, arch, nr["ioctl"], 0, 0x5401) == allow
    for name in ("execve", "ptrace", "mknodat", "mount", "setxattr", "pidfd_send_signal", "pidfd_open", "bpf",
                 "unshare", "io_uring_setup", "tkill", "personality", "keyctl", "perf_event_open"):
        assert _run_bpf(prog, arch, nr[name]) == eperm, name
    assert _run_bpf(prog, arch, nr["kill"], os.getpid()) == allow  # itself
    assert _run_bpf(prog, arch, nr["kill"], 1) == eperm
    assert _run_bpf(prog, arch, nr["tgkill"], os.getpid()) == allow
    assert _run_bpf(prog, arch, nr["socket"], 1) == eperm and _run_bpf(prog, arch, nr["socket"], 2) == eperm
    assert _run_bpf(prog, arch, nr["socketpair"], 1, 1 | 0x80000) == allow  # AF_UNIX, SOCK_STREAM|SOCK_CLOEXEC
    assert _run_bpf(prog, arch, nr["socketpair"], 1, 2) == eperm  # a datagram pair could sendto() a socket file
    assert _run_bpf(prog, arch, nr["socketpair"], 2, 1) == eperm
    assert _run_bpf(prog, arch, 0) == allow and _run_bpf(prog, arch, 63) == allow  # read / uname and the like
    assert _run_bpf(prog, 0x40000003, 1) == 0x80000000  # i386: an unknown ABI kills the process
    if machine == "x86_64":
        assert _run_bpf(prog, arch, 0x40000000 + 59) == eperm  # the x32 ABI


def test_the_first_20_humaneval_canonical_solutions_pass():
    from blt_decode.evaluation import humaneval as he
    from blt_decode.tools import prompt_sets

    problems = prompt_sets.humaneval_problems()[:20]
    with ThreadPoolExecutor(max_workers=2) as pool:  # as the runner does (--workers 2)
        results = list(pool.map(lambda p: run_program(he.program(p, p["canonical_solution"].encode()), AVAILABLE),
                                problems))
    assert [r.status for r in results] == ["passed"] * 20, [(p["task_id"], r) for p, r in zip(problems, results)
                                                           if not r.passed]
