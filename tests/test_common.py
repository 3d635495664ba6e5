"""Specification of nanochat/common.py: base dir, device/process setup errors, the
compute dtype (and its NANOCHAT_DTYPE override), rank-aware printing, peak tables,
the locked download, and torchrun on CPU (gloo)."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nanochat.common as common

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run_python(code, env_updates, timeout=300):
    """Run `code` in a fresh interpreter from the repo root with a modified environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_DTYPE", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(env_updates)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)

# -----------------------------------------------------------------------------
# base dir


def test_get_base_dir_honours_env_and_creates_it(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(target))
    assert common.get_base_dir() == str(target)
    assert target.is_dir()


def test_get_base_dir_defaults_to_cache_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "nanochat"
    assert common.get_base_dir() == str(expected)
    assert expected.is_dir()

# -----------------------------------------------------------------------------
# compute_init / dist info


def test_compute_init_rejects_unknown_device_type():
    with pytest.raises(ValueError, match=r"unknown device type 'tpu'.*cuda, mps, cpu"):
        common.compute_init("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_compute_init_cuda_without_cuda_says_how_to_fix():
    with pytest.raises(RuntimeError, match=r"CUDA is not available.*--device-type=cpu"):
        common.compute_init("cuda")


def test_compute_init_cpu_single_process(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ddp, rank, local_rank, world_size, device = common.compute_init("cpu")
    assert (ddp, rank, local_rank, world_size) == (False, 0, 0, 1)
    assert device == torch.device("cpu")
    # compute_init seeds the global RNG with 42
    drawn = torch.rand(3)
    torch.manual_seed(42)
    assert torch.equal(drawn, torch.rand(3))
    assert not common.is_ddp_initialized()
    common.compute_cleanup()  # must be a no-op without a process group


def test_get_dist_info_reads_torchrun_env(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not common.is_ddp_requested()
    assert common.get_dist_info() == (False, 0, 0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not common.is_ddp_requested()  # all three variables are needed
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert common.is_ddp_requested()
    assert common.get_dist_info() == (True, 3, 1, 4)


def test_print0_prints_on_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    common.print0("hidden")
    monkeypatch.setenv("RANK", "0")
    common.print0("shown", end="!")
    assert capsys.readouterr().out == "shown!"


@pytest.mark.slow
def test_compute_init_under_cpu_torchrun_uses_gloo():
    """Two ranks launched with torchrun-style env on CPU join a gloo group and all-reduce."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = """
        import torch, torch.distributed as dist
        from nanochat.common import compute_init, compute_cleanup, is_ddp_initialized
        ddp, rank, local_rank, world, device = compute_init("cpu")
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        print(ddp, rank, world, str(device), dist.get_backend(), int(t.item()))
        compute_cleanup()
        print(is_ddp_initialized())
    """
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}
    env.update(PYTHONPATH=str(REPO_ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err
        assert out.split("\n")[:2] == [f"True {r} 2 cpu gloo 3", "False"]

# -----------------------------------------------------------------------------
# compute dtype


def test_compute_dtype_is_float32_without_cuda():
    if torch.cuda.is_available() or os.environ.get("NANOCHAT_DTYPE"):
        pytest.skip("auto-detection on a CPU-only machine")
    assert common.COMPUTE_DTYPE == torch.float32
    assert common.COMPUTE_DTYPE_REASON == "auto-detected: no CUDA (CPU/MPS)"


def test_detect_compute_dtype_rejects_bad_override(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp8")
    with pytest.raises(ValueError, match=r"NANOCHAT_DTYPE='fp8'.*bfloat16, float16, float32"):
        common._detect_compute_dtype()


def test_nanochat_dtype_override_is_read_at_import():
    # COMPUTE_DTYPE is fixed when the module is imported, hence a fresh interpreter.
    # (That the model follows COMPUTE_DTYPE is checked in test_gpt.py.)
    result = _run_python("""
        import nanochat.common as c
        print(c.COMPUTE_DTYPE, c.COMPUTE_DTYPE_REASON, sep="|")
    """, {"NANOCHAT_DTYPE": "bfloat16"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "torch.bfloat16|set via NANOCHAT_DTYPE=bfloat16"


# -----------------------------------------------------------------------------
# peak tables, DummyWandb, download


def test_peak_tables_pick_most_specific_row_and_unknown_is_inf():
    assert common.get_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.get_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.get_peak_flops("NVIDIA H100 NVL") == 835e12
    assert common.get_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.get_peak_flops("NVIDIA L40S") == 362e12
    assert common.get_peak_flops("NVIDIA L4") == 121e12
    assert common.get_peak_flops("some cpu") == float("inf")
    assert common.get_peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert common.get_peak_bandwidth("NVIDIA H200") == 4.8e12
    assert common.get_peak_bandwidth("NVIDIA GeForce RTX 4090") == 1.01e12
    assert common.get_peak_bandwidth("some cpu") == float("inf")


def test_dummy_wandb_accepts_the_calls_scripts_make():
    run = common.DummyWandb()
    assert run.log({"loss": 1.0}, step=3) is None
    assert run.finish() is None


def test_download_file_with_lock_downloads_once(tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    source = tmp_path / "source.txt"
    source.write_bytes(b"payload")
    seen = []
    path = common.download_file_with_lock(source.as_uri(), "data.txt", postprocess_fn=seen.append)
    assert path == str(base / "data.txt")
    assert (base / "data.txt").read_bytes() == b"payload"
    assert seen == [path]
    # already present: no new download, no postprocess
    source.write_bytes(b"changed")
    assert common.download_file_with_lock(source.as_uri(), "data.txt", postprocess_fn=seen.append) == path
    assert (base / "data.txt").read_bytes() == b"payload"
    assert seen == [path]

# -----------------------------------------------------------------------------
# Quiet, honest logs: colours only on a terminal, no CUDA_HOME warning on CPU

LOG_A_LINE = """
    import nanochat.common as common
    common.logger.info("Shard 3 done, 100 MB")
"""


def test_log_piped_to_a_file_has_no_ansi_escapes():
    r = _run_python(LOG_A_LINE, {})
    assert "Shard 3 done, 100 MB" in r.stderr
    assert "\x1b" not in r.stderr


def test_log_on_a_terminal_keeps_its_colours_unless_no_color():
    import pty
    for env, coloured in (({}, True), ({"NO_COLOR": "1"}, False)):
        main, child = pty.openpty()
        env = dict({k: v for k, v in os.environ.items() if k != "NO_COLOR"}, PYTHONPATH=str(REPO_ROOT), **env)
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOG_A_LINE)], cwd=REPO_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child)
        os.close(child)
        out = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=120)
        os.close(main)
        assert b"Shard 3" in out
        assert (b"\x1b[" in out) == coloured, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning only exists on machines without a CUDA runtime")
def test_no_cuda_home_warning_on_cpu(tmp_path):
    probe = "import torch.utils.cpp_extension"
    control = _run_python(probe, {"CUDA_HOME": str(tmp_path)})
    assert "No CUDA runtime is found" in control.stderr  # torch alone does warn (the test can fail)
    r = _run_python("import nanochat.common\n" + probe, {"CUDA_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "No CUDA runtime is found" not in r.stderr
