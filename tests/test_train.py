"""
nanochat/train.py: the pre-training loop. Resume continues exactly; two CPU processes under
torchrun match one process at the same total batch; bad input is one clear line.
"""
import os
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "train_driver.py"

# a d2 model small enough that a step takes well under a second on one CPU core
TINY = ["--device-type=cpu", "--depth=2", "--aspect-ratio=64", "--head-dim=64", "--max-seq-len=64",
        "--window-pattern=L", "--device-batch-size=2", "--total-batch-size=256", "--warmup-steps=2",
        "--core-metric-every=-1", "--sample-every=-1", "--eval-every=-1"]


@pytest.fixture
def train_base_dir(upstream_fixtures, tmp_path):
    """Fixture shards + tokenizer, no checkpoints: a fresh base dir for a training run."""
    base = tmp_path / "base"
    shutil.copytree(upstream_fixtures / "base_data_climbmix", base / "base_data_climbmix")
    shutil.copytree(upstream_fixtures / "tokenizer", base / "tokenizer")
    return base


def run_driver(base, out_prefix, flags, nproc=1, emulate=0, extra=(), threads="1"):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_COMPILE="0", OMP_NUM_THREADS=threads,
               PYTHONPATH=str(REPO))
    if threads is None:
        env.pop("OMP_NUM_THREADS")  # torch's default: every core
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(DRIVER), str(out_prefix), "--", *flags]
    else:
        cmd = [sys.executable, str(DRIVER), str(out_prefix)] + ([f"--emulate-ranks={emulate}"] if emulate else []) + list(extra) + ["--", *flags]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def read_json(path):
    return json.loads(Path(path).read_text())


def test_resume_continues_with_the_same_losses(train_base_dir, tmp_path):
    flags = TINY + ["--num-iterations=6", "--save-every=3", "--model-tag=resume"]
    run_driver(train_base_dir, tmp_path / "full", flags)
    full = read_json(tmp_path / "full.rank0.json")
    ckpt = train_base_dir / "base_checkpoints" / "resume"
    assert {p.name for p in ckpt.iterdir()} >= {"model_000003.pt", "meta_000003.json", "optim_000003_rank0.pt", "model_000006.pt"}
    final_uninterrupted = torch.load(ckpt / "model_000006.pt")
    (ckpt / "model_000006.pt").unlink()

    run_driver(train_base_dir, tmp_path / "resumed", flags + ["--resume-from-step=3"])
    resumed = read_json(tmp_path / "resumed.rank0.json")
    assert len(full["train_losses"]) == 6 and len(resumed["train_losses"]) == 3
    assert resumed["train_losses"] == full["train_losses"][3:]  # bit-identical on CPU
    final_resumed = torch.load(ckpt / "model_000006.pt")
    for name, tensor in final_uninterrupted.items():
        assert torch.equal(tensor, final_resumed[name]), name
    meta = json.loads((ckpt / "meta_000006.json").read_text())
    assert meta["step"] == 6 and meta["user_config"]["resume_from_step"] == 3


def test_two_cpu_processes_match_one_process(train_base_dir, tmp_path):
    flags = TINY + ["--num-iterations=4", "--total-batch-size=256"]
    run_driver(train_base_dir, tmp_path / "single", flags + ["--model-tag=single"], emulate=2)
    run_driver(train_base_dir, tmp_path / "ddp", flags + ["--model-tag=ddp"], nproc=2)
    single = read_json(tmp_path / "single.rank0.json")["train_losses"]
    # one process logs its last micro-batch, which is what rank 1 computes in the 2-process run
    rank1 = read_json(tmp_path / "ddp.rank1.json")["train_losses"]
    assert len(single) == len(rank1) == 4
    assert single == pytest.approx(rank1, abs=1e-5)
    a = torch.load(train_base_dir / "base_checkpoints" / "single" / "model_000004.pt")
    b = torch.load(train_base_dir / "base_checkpoints" / "ddp" / "model_000004.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)
    # the weights moved: a vacuous comparison of two untouched inits would also pass above
    init = read_json(tmp_path / "single.rank0.json")
    assert init["step"] == 4


def test_base_train_missing_data_is_one_clear_line(tmp_path):
    base = tmp_path / "empty"
    base.mkdir()
    shutil.copytree(Path(os.environ.get("NANOCHAT_FIXTURES", REPO.parent / "shared/fixtures/nanochat")) / "tokenizer",
                    base / "tokenizer")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_COMPILE="0")
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, "--num-iterations=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nanochat.dataset" in last


def test_base_train_resume_from_missing_step_is_one_clear_line(train_base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(train_base_dir), NANOCHAT_COMPILE="0")
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, "--num-iterations=1", "--resume-from-step=5"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def _base_train(base, flags):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_COMPILE="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_resume_refuses_a_half_saved_step_and_a_meta_without_loop_state(train_base_dir):
    flags = ["--num-iterations=4", "--save-every=2", "--model-tag=half"]
    r = _base_train(train_base_dir, flags)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = train_base_dir / "base_checkpoints" / "half"
    manifest = json.loads((ckpt / "manifest_000004.json").read_text())
    assert manifest["committed"] and {"loader_000004_rank0.pt", "optim_000004_rank0.pt"} <= set(manifest["files"])
    # a save killed after its first write leaves the pending marker: step 4 is not a whole step
    (ckpt / "manifest_000004.json").write_text(json.dumps({"step": 4, "committed": False}))
    r = _base_train(train_base_dir, flags + ["--resume-from-step=4"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 4 ") and "never committed" in last and "last committed step is 2" in last
    # an upstream-style step (no manifest) whose meta lacks loop_state: one line naming the file
    (ckpt / "manifest_000002.json").unlink()
    meta = json.loads((ckpt / "meta_000002.json").read_text())
    del meta["loop_state"]
    (ckpt / "meta_000002.json").write_text(json.dumps(meta))
    r = _base_train(train_base_dir, flags + ["--resume-from-step=2"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "meta_000002.json has no 'loop_state' entry" in last


def test_resume_names_a_damaged_loader_snapshot(train_base_dir):
    flags = ["--num-iterations=2", "--save-every=2", "--model-tag=trunc"]
    assert _base_train(train_base_dir, flags).returncode == 0
    snapshot = train_base_dir / "base_checkpoints" / "trunc" / "loader_000002_rank0.pt"
    snapshot.write_bytes(snapshot.read_bytes()[: snapshot.stat().st_size // 2])
    r = _base_train(train_base_dir, flags + ["--resume-from-step=2", "--num-iterations=3"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "loader_000002_rank0.pt" in last and "bytes but step 2 was committed" in last


@pytest.mark.slow  # two short runs with every core; minutes on a loaded machine
def test_default_threads_resume_the_same_data_within_float_noise(train_base_dir, tmp_path):
    """What resume guarantees without OMP_NUM_THREADS=1 (README, "Checkpoints and resume"): the
    very same batches in the same order, and losses equal up to the order of float reductions."""
    flags = TINY + ["--num-iterations=6", "--save-every=3", "--model-tag=threads"]
    run_driver(train_base_dir, tmp_path / "full", flags, threads=None)
    ckpt = train_base_dir / "base_checkpoints" / "threads"
    full_loader = torch.load(ckpt / "loader_000006_rank0.pt")
    full_meta = json.loads((ckpt / "meta_000006.json").read_text())
    run_driver(train_base_dir, tmp_path / "resumed", flags + ["--resume-from-step=3"], threads=None)
    resumed_loader = torch.load(ckpt / "loader_000006_rank0.pt")
    assert set(full_loader) == set(resumed_loader)
    for key in full_loader:
        a, b = full_loader[key], resumed_loader[key]
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), key  # the same documents, in the same place
    resumed_meta = json.loads((ckpt / "meta_000006.json").read_text())
    assert resumed_meta["dataloader_state_dict"] == full_meta["dataloader_state_dict"]
    full = read_json(tmp_path / "full.rank0.json")["train_losses"]
    resumed = read_json(tmp_path / "resumed.rank0.json")["train_losses"]
    assert resumed == pytest.approx(full[3:], abs=1e-3)
