"""
Run Python code written by an LLM in a throwaway subprocess, with time, memory and
output limits, and report what happened. Used by tasks/humaneval.py and tool use.
The approach follows OpenAI's HumanEval harness
(https://github.com/openai/human-eval/blob/master/human_eval/execution.py).

What it guarantees (Linux with Landlock and seccomp, i.e. kernel 5.13+ on x86_64 or
aarch64; `isolation()` says what this machine enforces; enforced by the kernel, so ctypes,
posix.* or any other way around the Python layer changes nothing):
- no new processes: fork, vfork and clone (except threads) fail with EPERM and exec is
  refused, so the code cannot outlive its time limit by setsid, double fork or a fork bomb;
  at the timeout (or on exit) its process group is SIGKILLed and nothing else can exist
- no network: socket() of any family but AF_UNIX fails with EPERM; TCP bind/connect are
  also denied by Landlock (ABI 4+); io_uring (which can open sockets) is refused
- files: reads only under Python's prefixes, sys.path (stdlib, installed packages) and the
  system library directories; reads, writes, creates and deletes only in its own temporary
  working directory (symlinks are resolved, so a link does not lead out); everything else,
  /etc/passwd, $HOME, /tmp, the repository and /proc included, is "Permission denied"
- no ptrace, process_vm_*, namespaces (unshare/setns), mounts, bpf, perf or userfaultfd;
  signals and abstract unix sockets cannot reach processes outside the sandbox (ABI 6+)
- resources: address space / data / stack capped (default 256 MB, so a large allocation
  is a MemoryError), CPU seconds (a backstop for the wall clock), file size (stdout, stderr
  and files written are capped), core dumps off; with processes refused, threads are the
  only concurrency, each charged to the address-space cap
- a fresh interpreter per call, scrubbed environment, stdin closed, the working directory
  deleted afterwards; the caller never sees an exception from the code (an ExecutionResult)
If the kernel refuses to install a restriction it offers, the code does not run (fail closed,
"SandboxError" in the result). On a kernel without Landlock or another CPU, only the limits,
the process-group kill and the Python guard below apply.

What it does not guarantee:
- CPU and memory bandwidth, and the page cache, are shared with the machine; a program can
  run at full speed until its time limit. Reading what Python itself may read (its stdlib,
  site-packages, system libraries) is allowed. Time limits are wall-clock, not exact.
- kernel bugs: this is seccomp + Landlock, not a VM; run untrusted code at scale in a VM.
- The Python-level guard (os.fork etc. set to None, a socket subclass refusing AF_INET)
  stays as a first layer with readable errors; by itself it is not a security boundary.
"""

import ctypes
import inspect
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

# Cap on each of stdout / stderr / any file the code writes (RLIMIT_FSIZE).
MAX_OUTPUT_BYTES = 16 * 1024 * 1024

# -----------------------------------------------------------------------------

@dataclass
class ExecutionResult:
    """Result of executing Python code in a sandbox."""
    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False


# Kernel-enforced isolation: Landlock (filesystem, TCP, signals) and a seccomp filter
# (process creation, sockets, namespaces, tracing). These two functions run inside the
# child, before the untrusted code; their source is copied into the runner as it is
# (inspect.getsource), so they use nothing but the standard library. Neither can be undone
# by the code: both restrictions are kernel state that only ever narrows, they survive
# exec, and PR_SET_NO_NEW_PRIVS keeps a setuid binary from regaining anything.

def _apply_landlock(read_roots, write_root):
    """Restrict the filesystem to reading (and executing) under read_roots and anything under
    write_root; deny TCP bind/connect (ABI 4+) and signals / abstract unix sockets aimed outside
    the sandbox (ABI 6+). Returns the Landlock ABI applied, 0 when the kernel has none."""
    import ctypes, os, struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    CREATE, ADD_RULE, RESTRICT = 444, 445, 446  # the same numbers on x86_64 and aarch64
    abi = libc.syscall(CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return 0
    fs_rights = (1 << 13) - 1                     # ABI 1: execute .. make_sym
    fs_rights |= (1 << 13) if abi >= 2 else 0     # refer (rename/link across directories)
    fs_rights |= (1 << 14) if abi >= 3 else 0     # truncate
    fs_rights |= (1 << 15) if abi >= 5 else 0     # ioctl on devices
    read_rights = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read_file, read_dir
    file_rights = (1 << 0) | (1 << 1) | (1 << 2) | ((1 << 14) if abi >= 3 else 0) | ((1 << 15) if abi >= 5 else 0)
    if abi >= 6:
        attr = struct.pack("QQQ", fs_rights, 0b11, 0b11)  # net: bind+connect tcp; scoped: abstract unix, signal
    elif abi >= 4:
        attr = struct.pack("QQ", fs_rights, 0b11)
    else:
        attr = struct.pack("Q", fs_rights)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(CREATE, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")

    def allow(path, rights):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if not os.path.isdir(path):
                rights &= file_rights  # a file rule may only carry file rights
            rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
            if libc.syscall(ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
        finally:
            os.close(fd)

    for root in read_roots:
        if os.path.exists(root):
            allow(root, read_rights)
    allow(write_root, fs_rights)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if libc.syscall(RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return abi


def _apply_seccomp():
    """Install a seccomp filter: no new processes (fork, vfork, clone without CLONE_THREAD; clone3
    answers ENOSYS so threads fall back to clone), no exec, no sockets but AF_UNIX, no io_uring,
    ptrace, namespaces, mounts, bpf or cross-process memory access. A syscall of a foreign ABI
    (x32, or another architecture) kills the process. Returns False on an unsupported CPU."""
    import ctypes, errno, platform, struct
    machine = platform.machine()
    if machine == "x86_64":
        arch, nr = 0xC000003E, dict(fork=57, vfork=58, clone=56, execve=59, execveat=322, socket=41, ptrace=101,
                                    unshare=272, setns=308, mount=165, io_uring_setup=425, bpf=321,
                                    process_vm_readv=310, process_vm_writev=311, perf_event_open=298,
                                    userfaultfd=323, kexec_load=246, clone3=435)
    elif machine in ("aarch64", "arm64"):
        arch, nr = 0xC00000B7, dict(clone=220, execve=221, execveat=281, socket=198, ptrace=117, unshare=97,
                                    setns=268, mount=40, io_uring_setup=425, bpf=280, process_vm_readv=270,
                                    process_vm_writev=271, perf_event_open=241, userfaultfd=282, kexec_load=104,
                                    clone3=435)
    else:
        return False
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    deny = lambda e: 0x00050000 | e  # SECCOMP_RET_ERRNO
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]  # x32 syscalls
    for name, number in nr.items():
        if name == "socket":  # only AF_UNIX (1): local pairs, asyncio's self-pipe
            prog += [(JEQ, 0, 3, number), (LD, 0, 0, 16), (JEQ, 1, 0, 1), (RET, 0, 0, deny(errno.EPERM)),
                     (LD, 0, 0, 0)]
        elif name == "clone":  # threads (CLONE_THREAD) only
            prog += [(JEQ, 0, 3, number), (LD, 0, 0, 16), (JSET, 1, 0, 0x10000), (RET, 0, 0, deny(errno.EPERM)),
                     (LD, 0, 0, 0)]
        else:
            prog += [(JEQ, 0, 1, number), (RET, 0, 0, deny(errno.ENOSYS if name == "clone3" else errno.EPERM))]
    prog += [(RET, 0, 0, ALLOW)]
    # a jump that skips past "socket"/"clone" lands on their trailing LD, which reloads the number
    filt = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(filt, len(filt))
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(buf))
    fprog_buf = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: required to filter without CAP_SYS_ADMIN
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if libc.prctl(22, 2, fprog_buf, 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "installing the seccomp filter failed")
    return True


def _guard_source(maximum_memory_bytes, cpu_seconds, max_file_bytes):
    """
    Python source that runs in the child before the untrusted code. Everything it
    defines stays in the runner's own globals; the code itself is exec'd with a fresh
    globals dict and cannot see these names.
    """
    return _ISOLATION_SOURCE + f"""
import builtins, faulthandler, os, shutil, subprocess, sys
import resource

def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass  # a limit the platform refuses is skipped, never fatal

_memory = {maximum_memory_bytes!r}
if _memory is not None and sys.platform != "darwin":  # macOS rejects these limits
    _limit(resource.RLIMIT_AS, _memory)
    _limit(resource.RLIMIT_DATA, _memory)
    _limit(resource.RLIMIT_STACK, _memory)
_limit(resource.RLIMIT_CPU, {cpu_seconds!r})
_limit(resource.RLIMIT_FSIZE, {max_file_bytes!r})
_limit(resource.RLIMIT_CORE, 0)
if sys.platform != "darwin":
    _limit(resource.RLIMIT_NPROC, 0)  # no new processes or threads (not enforced for root)

# kernel-enforced isolation (see the module docstring): reads only where Python and its
# libraries live, writes only in the working directory, no processes, no network
import socket, _socket, _posixsubprocess
_here = os.path.dirname(os.path.abspath(__file__))
_read_roots = {{sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
               "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/dev/null", "/dev/zero", "/dev/urandom"}}
_read_roots |= {{p for p in sys.path if p and os.path.abspath(p) != _here}}
try:
    _landlock_abi = _apply_landlock(sorted(_read_roots), os.getcwd())
    _seccomp = _apply_seccomp()
except OSError as _e:
    # fail closed: without the isolation it promises, the code does not run
    sys.stderr.write(f"SandboxError: could not isolate the process ({{_e}})\\n")
    os._exit(1)

faulthandler.disable()
builtins.exit = None
builtins.quit = None
builtins.help = None

# no process creation, no escaping the process group, nothing destructive
for _name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp",
              "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
              "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
              "setsid", "setpgid", "setpgrp", "kill", "killpg", "remove", "removedirs",
              "rmdir", "fchdir", "setuid", "rename", "renames", "truncate", "replace", "unlink",
              "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
              "getcwd", "chdir"):
    if hasattr(os, _name):
        setattr(os, _name, None)
for _name in ("rmtree", "move", "chown"):
    setattr(shutil, _name, None)
subprocess.Popen = None
import _posixsubprocess
_posixsubprocess.fork_exec = None

# no network: only AF_UNIX sockets (local pairs, e.g. asyncio's self-pipe) may be made
import socket, _socket

def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled in the nanochat sandbox")

# socket.socket.__init__ defers to _socket.socket.__init__, so checking the family
# there covers both `socket.socket(...)` and a direct `_socket.socket(...)`.
_CSocket = _socket.socket
class _LocalOnlySocket(_CSocket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family != socket.AF_UNIX:
            _no_network()
        _CSocket.__init__(self, family, type, proto, fileno)
_socket.socket = _LocalOnlySocket
for _module in (socket, _socket):
    for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        setattr(_module, _name, _no_network)

for _name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_name] = None
"""


_ISOLATION_SOURCE = inspect.getsource(_apply_landlock) + "\n\n" + inspect.getsource(_apply_seccomp) + "\n"


def isolation():
    """What the kernel will enforce for execute_code on this machine: {"landlock_abi": int (0 = none),
    "seccomp": bool}. Without them only the rlimits, the timeout kill and the Python guard apply."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        abi = max(0, libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
    except (OSError, AttributeError):
        abi = 0
    return {"landlock_abi": int(abi) if sys.platform == "linux" else 0,
            "seccomp": sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64", "arm64")}


def _kill_process_group(pgid):
    """SIGKILL every process in the group, until none is left (or only zombies linger)."""
    for _ in range(20):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:
            return  # an unkillable member (e.g. a setuid binary): nothing more we can do
        time.sleep(0.01)


def _read_capped(f):
    f.seek(0)
    return f.read(MAX_OUTPUT_BYTES).decode("utf-8", errors="replace")


def execute_code(
    code: str,
    timeout: float = 5.0,  # seconds of wall-clock time
    maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024,  # 256MB, None = no memory limit
) -> ExecutionResult:
    """
    Run `code` in a sandboxed Python subprocess and report the outcome.

    Args:
        code: the Python program, as a string
        timeout: wall-clock limit in seconds (default 5.0); the process group is killed after it
        maximum_memory_bytes: address-space limit of the child (default 256MB, None disables it)

    Returns:
        ExecutionResult: success (exit status 0), the captured stdout / stderr, error (the
        last stderr line, e.g. "ZeroDivisionError: division by zero", or why it was stopped),
        and the timeout / memory_exceeded flags.

    Example:
        >>> execute_code("print('hello world')").stdout
        'hello world\\n'
    """
    if not isinstance(code, str):
        raise TypeError(f"execute_code expects the program as a str, got {type(code).__name__}")
    cpu_seconds = max(1, math.ceil(timeout) + 1)
    guard = _guard_source(maximum_memory_bytes, cpu_seconds, MAX_OUTPUT_BYTES)
    # The code travels as a repr'd literal and runs with fresh globals, so the guard's
    # names are invisible to it and no quoting in the code can break the runner.
    runner = guard + f"\nexec(compile({code!r}, '<llm>', 'exec'), {{'__name__': '__main__'}})\n"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    timed_out = False
    with tempfile.TemporaryDirectory() as tmpdir, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # the runner is a file (no argv length limit) outside the code's working directory
        runner_path = os.path.join(tmpdir, "runner.py")
        workdir = os.path.join(tmpdir, "work")
        os.mkdir(workdir)
        with open(runner_path, "w", encoding="utf-8") as f:
            f.write(runner)
        try:
            # Output goes to files, not pipes: a grandchild holding a pipe open cannot
            # make us wait, and RLIMIT_FSIZE bounds what we read back.
            process = subprocess.Popen(
                [sys.executable, runner_path],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group: one killpg takes everything
            )
        except OSError as e:
            return ExecutionResult(success=False, stdout="", stderr="",
                                   error=f"Could not start the sandbox process: {e}")
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # also runs on KeyboardInterrupt in the caller; kills leftovers on a normal exit too
            _kill_process_group(process.pid)
            process.wait()
        if timed_out:
            return ExecutionResult(success=False, stdout="", stderr="",
                                   error="Execution timed out (process killed)", timeout=True)
        stdout = _read_capped(out)
        stderr = _read_capped(err)

    returncode = process.returncode
    success = returncode == 0
    memory_exceeded = "MemoryError" in stderr or "Cannot allocate memory" in stderr
    error = None
    if not success:
        if returncode < 0:
            # killed by a signal before Python could report anything useful
            sig = -returncode
            name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
            if sig == signal.SIGXCPU:
                error = "Execution exceeded its CPU time limit (process killed)"
            elif sig == signal.SIGKILL:
                # not ours (we only kill after a timeout): most likely the kernel's OOM killer
                error = "Process killed by SIGKILL (likely out of memory)"
                memory_exceeded = True
            else:
                error = f"Process killed by signal {name}"
        else:
            # the last traceback line names the exception, e.g. "TypeError: ..."
            lines = stderr.strip().splitlines()
            error = lines[-1] if lines else "Execution failed"
    return ExecutionResult(
        success=success,
        stdout=stdout,
        stderr=stderr,
        error=error,
        memory_exceeded=memory_exceeded,
    )
