"""Running generated programs: each in its own subprocess, never in the evaluating process.

Every program gets a fresh scratch directory (its working directory, removed afterwards), a wall-clock
limit (the process group is killed), an address-space limit (``RLIMIT_AS``: a large allocation raises
MemoryError), CPU-time and file-size limits, the standard library only (``python -I -S -B``), and these
isolation layers, each used where this machine permits it (:func:`isolation` says which):

- an audit hook installed before the program runs (:mod:`blt_decode.evaluation._guard`): refuses
  socket creation and name lookups, new processes, signals, ctypes, and writes (or directory opens)
  outside the scratch directory. It stops accidents and ordinary code; Python's audit hooks are not a
  security boundary against code written to escape them, hence
- a new network namespace and mount namespace (``unshare --net --mount``; with ``-r`` as an
  unprivileged user where user namespaces are allowed): no network interface but a loopback that is
  down, and every mount read-only but the scratch directory; then ``setpriv`` drops all capabilities,
  so the program cannot remount anything.

A program passes when it exits 0 within its time after printing a token it was handed on stdin: a
program that exits early (``exit(0)`` before its tests ran) fails. For untrusted models at scale, run the
whole evaluation in a container or VM as well (docs/evaluation.md).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from blt_decode.checks import finite_in_range, is_int, to_float
from blt_decode.errors import BLTDecodeError

_GUARD = (Path(__file__).with_name("_guard.py")).read_text(encoding="utf-8")

#: the shell step that runs inside the new namespaces: the scratch directory becomes a mount of its own,
#: every mount is made read-only but that one, and all capabilities are dropped before the program runs
_NAMESPACE_SETUP = (
    'set -e; scratch=$1; shift; mount --bind "$scratch" "$scratch"; '
    'findmnt -rn -o TARGET | while read -r m; do [ "$m" = "$scratch" ] || mount -o remount,bind,ro "$m"; done; '
    'exec setpriv --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"'
)
#: bytes of each output stream kept in an Execution (the tail)
KEPT_OUTPUT = 4000


class SandboxError(BLTDecodeError):
    """A sandbox setting out of range, or the sandbox itself could not run a program."""


@attrs.frozen
class SandboxConfig:
    """Limits of one program run. ``audit_hook`` and ``namespaces`` switch the isolation layers (both on
    by default; tests turn one off to check the other alone)."""

    timeout_s: float = attrs.field(default=10.0, converter=to_float)
    memory_mb: int = 1024
    #: largest file the program may write, its output included (a bigger one kills it)
    max_file_mb: int = 16
    audit_hook: bool = True
    namespaces: bool = True

    def __attrs_post_init__(self) -> None:
        if not finite_in_range(self.timeout_s, 0.1, 3600.0):
            raise SandboxError(f"timeout_s must be a number in 0.1..3600 seconds, got {self.timeout_s!r}")
        if not is_int(self.memory_mb) or not 64 <= self.memory_mb <= 1 << 20:
            raise SandboxError(f"memory_mb must be an integer in 64..1048576, got {self.memory_mb!r}")
        if not is_int(self.max_file_mb) or not 1 <= self.max_file_mb <= 1 << 14:
            raise SandboxError(f"max_file_mb must be an integer in 1..16384, got {self.max_file_mb!r}")


@attrs.frozen
class Execution:
    """How one program ended."""

    #: "passed", "failed" (an exception, a failed assertion, a refused action, an early exit),
    #: "timed_out" (killed at the wall-clock limit) or "out_of_memory" (MemoryError under the limit)
    status: str
    returncode: int | None
    wall_s: float
    stdout: str  #: the tail of what it printed (the pass token removed)
    stderr: str  #: the tail of its error output

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[tuple[str, ...] | None, str]:
    """The command prefix that runs a program in new namespaces on this machine, or None and why not.
    Found once by running ``true`` through each candidate."""
    missing = [tool for tool in ("unshare", "setpriv", "findmnt", "mount", "sh") if shutil.which(tool) is None]
    if missing:
        return None, f"{', '.join(missing)} not found"
    probe = os.path.realpath(tempfile.mkdtemp(prefix="blt-sandbox-probe-"))
    reasons = []
    try:
        for flags in (("--mount", "--net"), ("--map-root-user", "--mount", "--net")):
            prefix = ("unshare", *flags, "--", "sh", "-c", _NAMESPACE_SETUP, "sh")
            try:
                run = subprocess.run([*prefix, probe, "true"], capture_output=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                reasons.append(f"unshare {' '.join(flags)}: {exc}")
                continue
            if run.returncode == 0:
                return prefix, f"unshare {' '.join(flags)}"
            reasons.append(f"unshare {' '.join(flags)}: {run.stderr.decode(errors='replace').strip()[-200:]}")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return None, "; ".join(reasons)


def isolation(config: SandboxConfig = SandboxConfig()) -> str:
    """One line saying which isolation layers a program run with ``config`` gets on this machine."""
    layers = [f"a subprocess per program (python -I -S -B), {config.timeout_s:g} s wall clock, "
              f"RLIMIT_AS {config.memory_mb} MiB, files up to {config.max_file_mb} MiB, a scratch directory"]
    if config.audit_hook:
        layers.append("audit hook (no sockets, processes, ctypes; no writes outside the scratch directory)")
    if config.namespaces:
        prefix, how = _namespace_prefix()
        layers.append(f"network + read-only mount namespaces, capabilities dropped ({how})" if prefix is not None
                      else f"no namespaces on this machine ({how})")
    return "; ".join(layers)


def _tail(path: Path) -> str:
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - KEPT_OUTPUT))
        return fh.read().decode("utf-8", errors="replace")


def run_program(source: str | bytes, config: SandboxConfig = SandboxConfig()) -> Execution:
    """Run ``source`` (a whole Python program) in a sandboxed subprocess and say how it ended."""
    data = source.encode("utf-8") if isinstance(source, str) else bytes(source)
    # the real path: the namespace step keeps the scratch mount writable by its name as findmnt shows it
    work = Path(os.path.realpath(tempfile.mkdtemp(prefix="blt-sandbox-")))
    try:
        scratch = work / "scratch"
        scratch.mkdir(mode=0o700)
        program = work / "program.py"
        program.write_bytes(data)
        prefix: tuple[str, ...] = ()
        if config.namespaces:
            found, _ = _namespace_prefix()
            prefix = (*found, str(scratch)) if found is not None else ()
        memory = config.memory_mb << 20
        command = [*prefix, sys.executable, "-I", "-S", "-B", "-c", _GUARD, str(scratch), str(program), str(memory),
                   str(max(1, int(config.timeout_s) + 1)), str(config.max_file_mb << 20), "1" if config.audit_hook else "0"]
        token = secrets.token_hex(16)
        out_path, err_path = work / "stdout", work / "stderr"
        started = time.perf_counter()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            try:
                proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=scratch,
                                        start_new_session=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                                     "LANG": "C.UTF-8"})
            except OSError as exc:
                raise SandboxError(f"cannot start the sandboxed program: {exc}") from None
            timed_out = False
            try:
                proc.stdin.write(f"{token}\n".encode())
                proc.stdin.close()
            except BrokenPipeError:  # it ended before reading its token
                pass
            try:
                proc.wait(timeout=config.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        wall = time.perf_counter() - started
        stdout, stderr = _tail(out_path), _tail(err_path)
        finished = stdout.endswith(f"\n{token}\n")
        if timed_out:
            status = "timed_out"
        elif proc.returncode == 0 and finished:
            status = "passed"
        elif "MemoryError" in stderr:
            status = "out_of_memory"
        else:
            status = "failed"
        return Execution(status, None if timed_out else proc.returncode, wall,
                         stdout.removesuffix(f"\n{token}\n"), stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
