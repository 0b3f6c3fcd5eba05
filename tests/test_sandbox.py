"""The sandbox really runs programs and really confines them: each layer is checked on its own where the
machine has it (the namespaces need unshare; CI machines without user namespaces skip those)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from blt_decode.evaluation import sandbox
from blt_decode.evaluation.sandbox import SandboxConfig, SandboxError, run_program

FULL = SandboxConfig(timeout_s=5)
HOOK_ONLY = SandboxConfig(timeout_s=5, namespaces=False)
NAMESPACES_ONLY = SandboxConfig(timeout_s=5, audit_hook=False)

needs_namespaces = pytest.mark.skipif(sandbox._namespace_prefix()[0] is None,
                                      reason=f"no namespaces here: {sandbox._namespace_prefix()[1]}")


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('checked')\n", FULL)
    assert ok.passed and ok.returncode == 0 and ok.stdout.strip() == "checked"
    wrong = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n", FULL)
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_an_early_exit_does_not_pass():
    # exit status 0, but the program never reached its end: the pass token was not printed
    early = run_program("import sys\nsys.exit(0)\nassert False\n", FULL)
    assert early.returncode == 0 and early.status == "failed"


def test_an_infinite_loop_is_stopped_at_the_time_limit():
    started = time.perf_counter()
    result = run_program("while True:\n    pass\n", SandboxConfig(timeout_s=1))
    assert result.status == "timed_out" and not result.passed
    assert time.perf_counter() - started < 10


def test_a_10_gb_allocation_is_stopped_by_the_memory_limit():
    started = time.perf_counter()
    result = run_program("block = bytearray(10 * 10**9)\n", FULL)
    assert result.status == "out_of_memory" and not result.passed and "MemoryError" in result.stderr
    assert time.perf_counter() - started < 10  # refused at once, never allocated


class _Listener:
    """A TCP server on loopback that records whether anybody connected."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
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


def _connect_program(port: int) -> str:
    return f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'escaped')\n"


def test_the_listener_is_reachable_without_a_sandbox():
    with _Listener() as listener:  # the control: the same connect works from this process
        socket.create_connection(("127.0.0.1", listener.port), timeout=2).close()
        deadline = time.monotonic() + 5
        while not listener.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listener.connections == 1


@pytest.mark.parametrize("config", [FULL, HOOK_ONLY, pytest.param(NAMESPACES_ONLY, marks=needs_namespaces)],
                         ids=["full", "audit-hook-only", "namespaces-only"])
def test_a_socket_connect_fails(config):
    with _Listener() as listener:
        result = run_program(_connect_program(listener.port), config)
        time.sleep(0.3)
        assert listener.connections == 0
    assert result.status == "failed"
    words = "sandbox: socket" if config.audit_hook else "Network is unreachable"
    assert words in result.stderr, result.stderr


ESCAPES = {
    "open": "open({path!r}, 'w').write('x')",
    "os.open": "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "rename": "open('inside.txt', 'w').write('x')\nimport os\nos.rename('inside.txt', {path!r})",
    "dir_fd": "import os\nd = os.open({parent!r}, os.O_RDONLY)\nos.close(os.open('outside.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d))",
    "subprocess": "import subprocess\nsubprocess.run(['touch', {path!r}], check=True)",
}


@pytest.mark.parametrize("how", list(ESCAPES))
@pytest.mark.parametrize("config", [FULL, HOOK_ONLY, pytest.param(NAMESPACES_ONLY, marks=needs_namespaces)],
                         ids=["full", "audit-hook-only", "namespaces-only"])
def test_writing_outside_the_scratch_directory_fails(tmp_path, config, how):
    target = tmp_path / "outside.txt"
    result = run_program(ESCAPES[how].format(path=str(target), parent=str(tmp_path)), config)
    assert result.status == "failed", result
    assert not target.exists()
    if config.audit_hook:
        assert "sandbox:" in result.stderr, result.stderr
    else:  # the mounts refuse it (a rename across the scratch mount cannot even be tried)
        assert "Read-only file system" in result.stderr or "cross-device link" in result.stderr, result.stderr


def test_the_scratch_directory_is_writable_and_removed_afterwards(tmp_path):
    result = run_program("import os\nopen('notes.txt', 'w').write('kept?')\nprint(os.getcwd())\n", FULL)
    assert result.passed, result
    from pathlib import Path

    assert not Path(result.stdout.strip()).exists()


def test_isolation_says_which_layers_run():
    text = sandbox.isolation(FULL)
    assert "RLIMIT_AS 1024 MiB" in text and "audit hook" in text and "namespace" in text
    assert "audit hook" not in sandbox.isolation(NAMESPACES_ONLY)


@pytest.mark.parametrize("kwargs,words", [({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("nan")}, "timeout_s"),
                                          ({"memory_mb": 10}, "memory_mb"), ({"memory_mb": True}, "memory_mb"),
                                          ({"max_file_mb": 0}, "max_file_mb")])
def test_bad_limits_are_refused(kwargs, words):
    with pytest.raises(SandboxError, match=words):
        SandboxConfig(**kwargs)
