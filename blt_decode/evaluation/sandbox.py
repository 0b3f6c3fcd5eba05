"""Running generated programs: each in its own subprocess, never in the evaluating process, contained by
the kernel rather than by the program's cooperation. Layers, limits and threat model: docs/evaluation.md
("The sandbox")."""

from __future__ import annotations

import functools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from blt_decode.checks import Validators, to_float
from blt_decode.errors import SandboxError

_GUARD = (Path(__file__).with_name("_guard.py")).read_text(encoding="utf-8")

#: the kernel layers, which a machine may lack (the audit hook always runs where it is switched on)
LAYERS = ("namespaces", "seccomp")
#: largest scratch tmpfs a caller may ask for, in MiB (it is memory)
MAX_SCRATCH_MB = 4096
#: RLIMIT_NPROC of a program's user (threads count): root ignores it, so seccomp is what stops forks
NPROC = 512
#: the flags of every namespace candidate; --kill-child: the namespace dies with unshare when the
#: evaluating process kills it at the wall-clock limit
_UNSHARE = ("--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net")
#: what runs as PID 1 of the new namespaces: the guard's ``--namespace-init`` (mounts by system calls,
#: then the program under ``setpriv``, as its child). Arguments: the scratch size in MiB, the scratch
#: directory, two empty staging directories, the home directories to hide (colon-separated) and the
#: Python installation to keep visible inside them (or ""), "--", the command
def _hidden(work: Path) -> tuple[str, str]:
    """The directories to hide from a program whose files are in ``work`` (homes, where its uid could read
    keys and tokens; /run, where the machine's daemons keep their sockets), and the interpreter's
    installation to keep visible in them: a directory holding ``work`` (a TMPDIR in a home) or the
    interpreter where its installation cannot be told stays visible."""
    python = os.path.realpath(sys.executable)
    keep = os.path.realpath(sys.base_prefix)
    if not python.startswith(keep + os.sep):
        keep = os.path.dirname(os.path.dirname(python))
    hide = [h for h in ("/root", "/home", "/run") if os.path.isdir(h) and not os.path.islink(h)
            and not str(work).startswith(h + os.sep)]
    return ":".join(hide), keep if any(keep.startswith(h + os.sep) for h in hide) else ""


#: bytes of each output stream kept in an Execution (the tail)
KEPT_OUTPUT = 4000
_CHECKS = Validators(SandboxError)


def _to_layers(value: Any) -> Any:
    """Converter: "a,b" or an iterable of layer names to a frozenset (anything else left for the validator)."""
    if isinstance(value, str):
        return frozenset(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (set, frozenset, list, tuple)):
        return frozenset(value)
    return value


def _check_layers(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, frozenset) or not all(isinstance(v, str) for v in value):
        raise SandboxError(f"{attribute.name}: expected layer names among {', '.join(LAYERS)}, got {value!r}")
    unknown = sorted(value - set(LAYERS))
    if unknown:
        raise SandboxError(f"{attribute.name}: unknown sandbox layer {', '.join(map(repr, unknown))}; "
                           f"the layers a machine may lack are {', '.join(LAYERS)}")


@attrs.frozen
class SandboxConfig:
    """Limits of one program run and its layers. ``namespaces``, ``seccomp`` and ``audit_hook`` switch
    the layers (all on by default; tests turn some off to check the others). A kernel layer that is
    switched off, or missing on this machine, must be named in ``unsafe_without``: without it, runs are
    refused (:func:`check`)."""

    #: seconds of wall-clock time
    timeout_s: float = attrs.field(default=10.0, converter=to_float, validator=_CHECKS.number(0.1, 3600.0))
    memory_mb: int = attrs.field(default=1024, validator=_CHECKS.integer(64, 1 << 20))
    #: largest file the program may write, its output included (a bigger write fails)
    max_file_mb: int = attrs.field(default=16, validator=_CHECKS.integer(1, 1 << 14))
    #: the scratch directory's total size (a tmpfs in the mount namespace; writes beyond fail with ENOSPC)
    scratch_mb: int = attrs.field(default=64, validator=_CHECKS.integer(1, MAX_SCRATCH_MB))
    audit_hook: bool = attrs.field(default=True, validator=_CHECKS.flag())
    namespaces: bool = attrs.field(default=True, validator=_CHECKS.flag())
    seccomp: bool = attrs.field(default=True, validator=_CHECKS.flag())
    #: kernel layers the caller knowingly runs without (``--unsafe-sandbox``)
    unsafe_without: frozenset = attrs.field(default=frozenset(), converter=_to_layers, validator=_check_layers)

    def __attrs_post_init__(self) -> None:
        off = [layer for layer in LAYERS if not getattr(self, layer) and layer not in self.unsafe_without]
        if off:
            raise SandboxError(f"{', '.join(f'{layer}=False' for layer in off)} runs generated code without that "
                               f"layer; name it in unsafe_without (--unsafe-sandbox {','.join(off)}) to do so knowingly")


@attrs.frozen
class Execution:
    """How one program ended."""

    #: "passed", "failed" (an exception, a failed assertion, a refused action, an early exit, a signal),
    #: "timed_out" (killed at the wall-clock limit) or "out_of_memory" (it died of a MemoryError)
    status: str
    returncode: int | None
    wall_s: float
    stdout: str  #: the tail of what it printed (the pass token removed)
    stderr: str  #: the tail of its error output
    #: how the process ended: "exit status N", "exception NAME", "signal NAME", "wall-clock limit"
    ended: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[tuple[str, ...] | None, str]:
    """The command prefix that runs a program in new namespaces on this machine, or None and why not.
    Found once by running the interpreter through each candidate."""
    missing = [tool for tool in ("unshare", "setpriv") if shutil.which(tool) is None]
    if missing:
        return None, f"{', '.join(missing)} not found"
    probe = os.path.realpath(tempfile.mkdtemp(prefix="blt-sandbox-probe-"))
    reasons = []
    try:
        for flags in (_UNSHARE, ("--map-root-user", *_UNSHARE)):
            prefix = ("unshare", *flags, "--", sys.executable, "-I", "-S", "-B", "-c", _GUARD, "--namespace-init")
            shown = "unshare " + " ".join(f for f in flags if f in ("--map-root-user", "--pid", "--mount", "--net"))
            try:
                for name in ("scratch", "dev", "stage"):
                    os.makedirs(os.path.join(probe, name), exist_ok=True)
                run = subprocess.run([*prefix, "1", *(os.path.join(probe, name) for name in ("scratch", "dev", "stage")),
                                      *_hidden(Path(probe)), "--", sys.executable, "-I", "-S", "-B", "-c", "import os"],
                                     capture_output=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                reasons.append(f"{shown}: {exc}")
                continue
            if run.returncode == 0:
                return prefix, shown
            reasons.append(f"{shown}: {run.stderr.decode(errors='replace').strip()[-200:]}")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return None, "; ".join(reasons)


@functools.lru_cache(maxsize=None)
def _seccomp_probe() -> tuple[bool, str]:
    """Does the guard's seccomp filter install here (and refuse a fork, and keep threads)? Found once."""
    try:
        run = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", _GUARD, "--probe-seccomp"], capture_output=True,
                             timeout=30, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if run.returncode != 0:
        return False, (run.stderr.decode(errors="replace").strip().splitlines() or [f"exit status {run.returncode}"])[-1][-200:]
    return True, f"{os.uname().machine} BPF filter, no-new-privs"


def missing_layers(config: SandboxConfig = SandboxConfig()) -> dict[str, str]:
    """The kernel layers a run with ``config`` would go without, each with why (switched off, or not
    available on this machine and why)."""
    missing = {}
    if not config.namespaces:
        missing["namespaces"] = "switched off"
    elif _namespace_prefix()[0] is None:
        missing["namespaces"] = f"unavailable here: {_namespace_prefix()[1]}"
    if not config.seccomp:
        missing["seccomp"] = "switched off"
    elif not _seccomp_probe()[0]:
        missing["seccomp"] = f"unavailable here: {_seccomp_probe()[1]}"
    return missing


@functools.lru_cache(maxsize=None)
def _warn_once(layer: str, why: str) -> None:
    print(f"blt-decode: WARNING: generated code runs without the sandbox's {layer} layer ({why}), as "
          f"--unsafe-sandbox allows", file=sys.stderr, flush=True)


def check(config: SandboxConfig = SandboxConfig()) -> None:
    """Refuse (SandboxError) to run with a kernel layer missing that ``config.unsafe_without`` does not
    name; say once on stderr for each one it does name."""
    missing = missing_layers(config)
    refused = sorted(set(missing) - config.unsafe_without)
    if refused:
        shown = "; ".join(f"{layer}: {missing[layer]}" for layer in refused)
        raise SandboxError(f"the sandbox lacks {', '.join(refused)} on this machine ({shown}); generated code is not "
                           f"run without it: pass --unsafe-sandbox {','.join(refused)} (library: "
                           f"SandboxConfig(unsafe_without=...)) to run anyway, knowingly")
    for layer in sorted(missing):
        if missing[layer] != "switched off":
            _warn_once(layer, missing[layer])


def unsafe_layers(text: str | None) -> frozenset:
    """``--unsafe-sandbox``'s value: layer names, each of which must really be missing on this machine
    (the flag lets a run go without a layer it cannot have, never switches a working one off)."""
    if text is None:
        return frozenset()
    names = _to_layers(text)
    if not names or not names <= set(LAYERS):
        raise SandboxError(f"--unsafe-sandbox: expected comma-separated layer names among {', '.join(LAYERS)}, "
                           f"got {text!r}")
    missing = missing_layers(SandboxConfig())
    present = sorted(names - set(missing))
    if present:
        raise SandboxError(f"--unsafe-sandbox names {', '.join(present)}, which this machine has; it takes only the "
                           f"missing layers ({', '.join(sorted(missing)) or 'none are missing here'})")
    return names


def isolation(config: SandboxConfig = SandboxConfig()) -> str:
    """One line saying, layer by layer, what isolates a program run with ``config`` on this machine."""
    parts = [f"a subprocess per program (python -I -S -B), {config.timeout_s:g} s wall clock, "
             f"RLIMIT_AS {config.memory_mb} MiB, files up to {config.max_file_mb} MiB, scratch {config.scratch_mb} MiB, "
             f"RLIMIT_NPROC {NPROC}"]
    missing = missing_layers(config)
    if "namespaces" in missing:
        parts.append(f"namespaces: OFF ({missing['namespaces']})")
    else:
        parts.append(f"namespaces: PID, network, mount (read-only but a {config.scratch_mb} MiB tmpfs scratch; a "
                     f"minimal /dev; /root, /home and /run hidden), capabilities dropped ({_namespace_prefix()[1]})")
    if "seccomp" in missing:
        parts.append(f"seccomp: OFF ({missing['seccomp']})")
    else:
        parts.append("seccomp: no new processes (threads only), no exec, no signals but to itself, no ptrace, "
                     f"no sockets but AF_UNIX stream pairs, no mknod/mount/xattr writes ({_seccomp_probe()[1]})")
    parts.append("audit hook: no sockets, processes, ctypes; no writes outside the scratch directory"
                 if config.audit_hook else "audit hook: off")
    return "; ".join(parts)


def _tail(path: Path) -> str:
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - KEPT_OUTPUT))
        return fh.read().decode("utf-8", errors="replace")


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until ``proc`` ends or ``timeout`` passes, without reaping it (so that its process group
    cannot be reused before it is killed). True when it ended in time."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd: wait (and reap) as before
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if poller.poll(max(1, int(left * 1000))):
                return True
        return False
    finally:
        os.close(fd)


def _child_namespace(pid: int) -> str | None:
    """The PID namespace of ``pid``'s first child (``unshare --fork``'s: the namespace the program runs in),
    or None (no child, or no /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        namespace = os.readlink(f"/proc/{children[0]}/ns/pid") if children else None
        return None if namespace == os.readlink("/proc/self/ns/pid") else namespace
    except (OSError, IndexError):
        return None


def _wait_until_gone(group: int, namespace: str | None, limit_s: float = 10.0) -> None:
    """Wait until no process of process group ``group`` (and of PID namespace ``namespace``) is left:
    SIGKILL is delivered at once but a process takes a moment to die, the more so on a loaded machine, and
    a run must leave nothing behind when it returns. Bounded by ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not any(_belongs(entry, group, namespace) for entry in os.scandir("/proc") if entry.name.isdigit()):
            return
        time.sleep(0.005)


def _belongs(entry: os.DirEntry, group: int, namespace: str | None) -> bool:
    """A live process (not a zombie: it runs nothing, and its reaper may be slow) of the group or namespace."""
    try:
        stat = Path(f"{entry.path}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if fields[0] == "Z":
            return False
        return int(fields[2]) == group or (namespace is not None and os.readlink(f"{entry.path}/ns/pid") == namespace)
    except (OSError, ValueError, IndexError):
        return False


def _ending(report: bytes, returncode: int, in_namespace: bool) -> str:
    """How the process ended: the guard's report, else the signal that killed it, else its exit status."""
    lines = report.decode("utf-8", errors="replace").splitlines()
    if lines and lines[-1].startswith(("exit ", "exception ")):
        word, _, what = lines[-1].partition(" ")
        return f"exit status {what}" if word == "exit" else f"exception {what}"
    # the namespace's init reports a child killed by signal N as exit status 128 + N, as a shell does
    number = -returncode if returncode < 0 else returncode - 128 if in_namespace and 128 < returncode < 128 + 65 else None
    if number is not None:
        try:
            return f"signal {signal.Signals(number).name}"
        except ValueError:
            return f"signal {number}"
    return f"exit status {returncode}"


def run_program(source: str | bytes, config: SandboxConfig = SandboxConfig()) -> Execution:
    """Run ``source`` (a whole Python program) in a sandboxed subprocess and say how it ended."""
    check(config)
    data = source.encode("utf-8") if isinstance(source, str) else bytes(source)
    # the real path: the namespace init mounts the scratch tmpfs there by name
    work = Path(os.path.realpath(tempfile.mkdtemp(prefix="blt-sandbox-")))
    try:
        scratch = work / "scratch"
        scratch.mkdir(mode=0o700)
        program = work / "program.py"
        program.write_bytes(data)
        prefix: tuple[str, ...] = ()
        found = _namespace_prefix()[0] if config.namespaces else None
        if found is not None:
            (work / "dev").mkdir(mode=0o700)
            (work / "stage").mkdir(mode=0o700)
            prefix = (*found, str(config.scratch_mb), str(scratch), str(work / "dev"), str(work / "stage"), *_hidden(work),
                      "--")
        seccomp = config.seccomp and _seccomp_probe()[0]
        report_r, report_w = os.pipe()
        command = [*prefix, sys.executable, "-I", "-S", "-B", "-c", _GUARD, str(scratch), str(program),
                   str(config.memory_mb << 20), str(max(1, int(config.timeout_s) + 1)), str(config.max_file_mb << 20),
                   str(config.scratch_mb << 20), str(NPROC), "1" if config.audit_hook else "0",
                   "1" if seccomp else "0", str(report_w)]
        token = secrets.token_hex(16)
        out_path, err_path = work / "stdout", work / "stderr"
        started = time.perf_counter()
        try:
            with out_path.open("wb") as out, err_path.open("wb") as err:
                try:
                    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=scratch,
                                            start_new_session=True, pass_fds=(report_w,),
                                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
                except OSError as exc:
                    raise SandboxError(f"cannot start the sandboxed program: {exc}") from None
                finally:
                    os.close(report_w)
                try:
                    proc.stdin.write(f"{token}\n".encode())
                    proc.stdin.close()
                except BrokenPipeError:  # it ended before reading its token
                    pass
                timed_out = not _wait(proc, config.timeout_s)
                # the program's PID namespace, read while its init lives (a timed-out run)
                namespace = _child_namespace(proc.pid) if prefix else None
                # in every case, ended or not: its process group (a fallback without the PID namespace, whose
                # end kills everything in it anyway) goes before the leader is reaped
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                _wait_until_gone(proc.pid, namespace)
            os.set_blocking(report_r, False)
            try:
                report = os.read(report_r, 4096)
            except BlockingIOError:
                report = b""
        finally:
            os.close(report_r)
        wall = time.perf_counter() - started
        stdout, stderr = _tail(out_path), _tail(err_path)
        finished = stdout.endswith(f"\n{token}\n")
        ended = "wall-clock limit" if timed_out else _ending(report, proc.returncode, bool(prefix))
        if timed_out:
            status = "timed_out"
        elif proc.returncode == 0 and finished:
            status = "passed"
        elif ended == "exception MemoryError":
            status = "out_of_memory"
        else:
            status = "failed"
        return Execution(status, None if timed_out else proc.returncode, wall,
                         stdout.removesuffix(f"\n{token}\n"), stderr, ended)
    finally:
        shutil.rmtree(work, ignore_errors=True)
