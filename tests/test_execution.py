"""
Specification of nanochat/execution.py: LLM-written code runs in a throwaway subprocess;
whatever it does (loop forever, eat memory, fork, open sockets, flood stdout) it is
stopped and reported in an ExecutionResult, and the caller carries on unharmed.

python -m pytest tests/test_execution.py -q
"""

import os
import signal
import socket
import time

import pytest

import nanochat.execution as execution
from nanochat.execution import ExecutionResult, execute_code


def process_is_gone(pid):
    """True once pid has exited (a zombie waiting for a non-reaping init counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return True

# -----------------------------------------------------------------------------
# Normal outcomes

def test_success_captures_stdout_and_stderr():
    result = execute_code("import sys\nprint('hello', 6 * 7)\nprint('note', file=sys.stderr)")
    assert isinstance(result, ExecutionResult)
    assert result.success and result.error is None
    assert result.stdout == "hello 42\n"
    assert result.stderr == "note\n"
    assert not result.timeout and not result.memory_exceeded


def test_exception_is_captured_with_its_last_line():
    result = execute_code("print('before')\ndef f():\n    return 1 / 0\nf()")
    assert not result.success and not result.timeout
    assert result.stdout == "before\n"
    assert result.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in result.stderr and '"<llm>", line 3' in result.stderr


def test_code_sees_fresh_globals_and_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import os\nprint(sorted(globals()), 'NANOCHAT_TEST_SECRET' in os.environ, __name__)")
    assert result.success
    assert result.stdout == "['__builtins__', '__name__', 'os'] False __main__\n"


def test_stdin_is_closed():
    result = execute_code("input()")
    assert not result.success and "EOFError" in result.error


def test_files_are_written_in_a_private_directory_that_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = execute_code("open('scratch.txt', 'w').write('data')\nprint(open('scratch.txt').read())")
    assert result.success and result.stdout == "data\n"
    assert not (tmp_path / "scratch.txt").exists()


def test_quotes_braces_and_large_programs_survive_the_runner():
    tricky = "s = 'it\\'s \"quoted\" \\\\ {braces} {{double}} \\n'\nprint(len(s), s.count('{'))"
    result = execute_code(tricky)
    assert result.success and result.stdout == "37 3\n"
    # far beyond the kernel's 128 KiB limit on a single command-line argument
    big = "x = 0\n" + "x += 1\n" * 40000 + "print(x)"
    result = execute_code(big)
    assert result.success and result.stdout == "40000\n"


def test_invalid_utf8_output_does_not_break_the_caller():
    result = execute_code("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe end')")
    assert result.success
    assert result.stdout.startswith("ok ") and result.stdout.endswith(" end")


def test_non_string_code_is_a_clear_error():
    with pytest.raises(TypeError, match="expects the program as a str"):
        execute_code(b"print(1)")

# -----------------------------------------------------------------------------
# Runaway code is stopped and reported

def test_infinite_loop_times_out_promptly():
    t0 = time.time()
    result = execute_code("print('started', flush=True)\nwhile True:\n    pass", timeout=1.0)
    elapsed = time.time() - t0
    assert result.timeout and not result.success
    assert result.error == "Execution timed out (process killed)"
    assert elapsed < 4, f"the process was not killed promptly ({elapsed:.1f}s)"


def test_sleeping_code_times_out_too():
    result = execute_code("import time\ntime.sleep(30)", timeout=0.5)
    assert result.timeout and not result.success


@pytest.mark.parametrize("bomb", [
    "x = bytearray(1024 * 1024 * 1024)",                 # one 1 GiB allocation
    "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))",  # steady growth
])
def test_memory_bomb_is_stopped(bomb):
    result = execute_code(bomb, timeout=10.0)
    assert not result.success and not result.timeout
    assert result.memory_exceeded
    assert result.error == "MemoryError"


def test_memory_limit_is_configurable():
    code = "x = bytearray(300 * 1024 * 1024)\nprint(len(x) // 2**20)"
    assert not execute_code(code).success  # above the 256 MiB default
    result = execute_code(code, maximum_memory_bytes=None)
    assert result.success and result.stdout == "300\n"


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess\nsubprocess.run(['echo', 'hi'])",
    "import os\nos.system('echo hi')",
    "import os\nos.posix_spawn('/bin/echo', ['echo', 'hi'], {})",
    "import os\nos.execv('/bin/echo', ['echo', 'hi'])",
    "import multiprocessing\nwith multiprocessing.Pool(2) as pool:\n    print(pool.map(abs, [-1, -2]))",
    "import _posixsubprocess\n_posixsubprocess.fork_exec()",
    "import os\nos.setsid()",
])
def test_process_creation_is_refused(code):
    result = execute_code(code, timeout=5.0)
    assert not result.success and not result.timeout
    assert "hi" not in result.stdout
    assert result.error.startswith("TypeError"), result.error  # the disabled function is None


def test_escaped_grandchild_is_killed_and_cannot_stall_the_caller():
    # ctypes gets around the Python-level guard; the process-group kill still applies
    code = (
        "import ctypes, time\n"
        "pid = ctypes.CDLL(None).fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"  # the grandchild keeps stdout open and lingers
        "else:\n"
        "    print(pid, flush=True)\n"
    )
    t0 = time.time()
    result = execute_code(code, timeout=10.0)
    assert time.time() - t0 < 5, "the caller waited on the lingering grandchild"
    assert result.success
    pid = int(result.stdout.split()[0])
    if pid == -1:
        return  # RLIMIT_NPROC refused the fork outright (non-root user): also fine
    deadline = time.time() + 2
    while not process_is_gone(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert process_is_gone(pid), f"grandchild {pid} survived the sandbox"


def test_output_flood_is_capped(monkeypatch):
    monkeypatch.setattr(execution, "MAX_OUTPUT_BYTES", 1024 * 1024)
    t0 = time.time()
    result = execute_code("while True:\n    print('x' * 10000)", timeout=10.0)
    assert time.time() - t0 < 8
    assert not result.success and not result.timeout
    assert "File too large" in result.error
    assert 0 < len(result.stdout) <= 1024 * 1024


def test_death_by_signal_is_reported():
    result = execute_code("import signal\nsignal.raise_signal(signal.SIGSEGV)")
    assert not result.success
    assert result.error == "Process killed by signal SIGSEGV"

# -----------------------------------------------------------------------------
# Network

def test_network_is_blocked():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        attempts = [
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
            f"import _socket\n_socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).connect(('127.0.0.1', {port}))",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
            "import socket\nsocket.getaddrinfo('localhost', 80)",
        ]
        for code in attempts:
            result = execute_code(code)
            assert not result.success, code
            assert "network access is disabled" in result.error, (code, result.error)
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever reached us
    finally:
        listener.close()


def test_local_socketpairs_still_work():
    # asyncio's event loop needs an AF_UNIX socketpair for its self-pipe
    code = "import asyncio\nasync def main():\n    return 7\nprint(asyncio.run(main()))"
    result = execute_code(code)
    assert result.success and result.stdout == "7\n"

# -----------------------------------------------------------------------------
# The caller is unaffected

def test_caller_keeps_working_after_failures():
    for code in ("while True: pass", "x = bytearray(2**31)", "import os; os.fork()", "raise SystemExit(3)"):
        assert not execute_code(code, timeout=0.5).success
    # the guard lived only in the children: our own process still has everything
    assert callable(os.fork) and callable(os.system) and callable(os.kill)
    assert socket.socket is not None and callable(socket.getaddrinfo)
    result = execute_code("print(sum(range(10)))")
    assert result.success and result.stdout == "45\n"

# -----------------------------------------------------------------------------
# Escapes past the Python guard: the kernel (seccomp, Landlock) refuses them

needs_kernel_isolation = pytest.mark.skipif(
    not (execution.isolation()["seccomp"] and execution.isolation()["landlock_abi"] >= 1),
    reason="this kernel/CPU offers no seccomp filter or Landlock; only the Python guard applies")


@needs_kernel_isolation
@pytest.mark.parametrize("code", [
    # the reported escape: posix (not os) fork, then setsid, outliving the process-group kill
    "import posix, time\npid = posix.fork()\nif pid == 0:\n    posix.setsid()\n    time.sleep(30)\nprint(pid)",
    # double fork through ctypes, and the raw syscalls behind it
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.fork()\n"
    "if r == 0:\n    libc.fork()\n    libc.sleep(30)\nassert r == -1, r\nimport os\nraise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.syscall(57)\nassert r == -1, r\n"
    "import os\nraise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.syscall(56, 17, 0, 0, 0, 0)\nassert r == -1, r\n"
    "import os\nraise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))",
    # a fork bomb
    "import posix\nwhile True:\n    posix.fork()",
    # exec of another program
    "import posix\nposix.execv('/bin/sh', ['sh', '-c', 'echo hi'])",
])
def test_process_creation_is_refused_by_the_kernel(code):
    if "syscall(5" in code and os.uname().machine != "x86_64":
        pytest.skip("x86_64 syscall numbers")
    t0 = time.time()
    result = execute_code(code, timeout=5.0)
    assert time.time() - t0 < 4 and not result.timeout
    assert not result.success and "hi" not in result.stdout
    assert "Operation not permitted" in result.error, result.error


@needs_kernel_isolation
@pytest.mark.parametrize("code", [
    "import _socket\nbase = _socket.socket.__mro__[1]\nbase(_socket.AF_INET, _socket.SOCK_STREAM)",
    "import _socket\n_socket.socket.__mro__[1](_socket.AF_INET6, _socket.SOCK_DGRAM)",
    "import _socket\n_socket.socket.__mro__[1](_socket.AF_PACKET if hasattr(_socket, 'AF_PACKET') else 17, 3)",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\nassert fd == -1, fd\n"
    "import os\nraise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))",
])
def test_sockets_behind_the_guard_are_refused_by_the_kernel(code):
    result = execute_code(code)
    assert not result.success and "Operation not permitted" in result.error, result.error


@needs_kernel_isolation
def test_files_outside_the_working_directory_cannot_be_read_or_written(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    attempts = [
        "print(open('/etc/passwd').read())",
        f"print(open({str(outside)!r}).read())",
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        "open('/tmp/nanochat_sandbox_escape.txt', 'w').write('x')",
        "open('../runner.py', 'a').write('x')",  # the runner beside the working directory
        f"import os\nos.symlink({str(tmp_path / 'via_link.txt')!r}, 'link')\nopen('link', 'w').write('x')",
        f"import os\nprint(os.listdir({str(tmp_path)!r}))",
        "import os\nprint(os.listdir('/proc'))",
    ]
    for code in attempts:
        result = execute_code(code)
        assert not result.success and "Permission denied" in result.error, (code, result.error)
        assert "secret" not in result.stdout and "root:" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.txt"]
    assert not os.path.exists("/tmp/nanochat_sandbox_escape.txt")
    # what it needs still works: its own directory, the standard library, installed packages
    result = execute_code("import json, numpy\nopen('a.txt', 'w').write('7')\nprint(json.loads(open('a.txt').read()) "
                          "+ int(numpy.arange(3).sum()))")
    assert result.success and result.stdout == "10\n", result.error


@needs_kernel_isolation
def test_threads_still_work_and_signals_outside_are_refused():
    result = execute_code("import threading\nout = []\nt = threading.Thread(target=out.append, args=(5,))\n"
                          "t.start(); t.join()\nprint(out)")
    assert result.success and result.stdout == "[5]\n", result.error
    if execution.isolation()["landlock_abi"] < 6:
        pytest.skip("Landlock signal scoping needs ABI 6")
    # SIGURG is ignored by default, so even a failure of the sandbox would not hurt the test runner
    result = execute_code(f"import posix, signal\nposix.kill({os.getpid()}, signal.SIGURG)")
    assert not result.success and "Operation not permitted" in result.error, result.error


def test_large_allocations_are_stopped():
    for code in ("x = bytearray(8 * 2**30)", "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.malloc.restype = ctypes.c_void_p\n"
                 "assert libc.malloc(ctypes.c_size_t(2**33)) is None\nraise MemoryError('malloc refused')"):
        result = execute_code(code, timeout=10.0)
        assert not result.success and result.memory_exceeded, result.error
