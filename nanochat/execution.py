"""
Run Python code written by an LLM in a throwaway subprocess, with time, memory and
output limits, and report what happened. Used by tasks/humaneval.py and tool use.
The approach follows OpenAI's HumanEval harness
(https://github.com/openai/human-eval/blob/master/human_eval/execution.py).

What the sandbox does:
- a fresh interpreter per call, in its own session / process group, with a scrubbed
  environment, stdin closed, and a temporary working directory deleted afterwards
- wall-clock timeout: on expiry the whole process group is SIGKILLed, so anything
  the code managed to spawn dies with it; stragglers are also killed on normal exit
- rlimits in the child: address space / data / stack (memory), CPU seconds (a
  backstop for the wall clock), file size (stdout, stderr and files written are
  capped, so a print loop cannot fill the disk or the caller's memory), and no new
  processes or threads (RLIMIT_NPROC; Linux does not enforce it for root, where the
  guard below and the process-group kill do the job)
- a guard that runs before the code and disables process creation (fork, exec,
  spawn, subprocess), destructive os/shutil functions, and network sockets and DNS
  (only AF_UNIX sockets remain, so local socketpairs still work)
- the caller never sees an exception from the code: every outcome is an ExecutionResult

What it is not:
- not a security boundary. The guard lives in the same interpreter as the code, so
  ctypes or other introspection can undo it; there is no seccomp, namespace or
  container isolation. It protects against accidents (an infinite loop, a memory
  blow-up, a stray rm -rf, an unexpected download), not against an adversary.
"""

import math
import os
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


def _guard_source(maximum_memory_bytes, cpu_seconds, max_file_bytes):
    """
    Python source that runs in the child before the untrusted code. Everything it
    defines stays in the runner's own globals; the code itself is exec'd with a fresh
    globals dict and cannot see these names.
    """
    return f"""
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
