"""
megacontext/variant.py through nanochat's real training loop: a vanilla run is bit-identical
whether or not megacontext was imported, and a JT1 run trains and saves every GistNet
parameter while the base model stays frozen.
"""
import os
import math
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacontext.telemetry import read_jsonl
from test_train import TINY, run_driver, read_json

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def train_base_dir(upstream_fixtures, tmp_path):
    base = tmp_path / "base"
    for sub in ("base_data_climbmix", "tokenizer", "base_checkpoints"):
        shutil.copytree(upstream_fixtures / sub, base / sub)
    return base


def test_vanilla_is_bit_identical_with_megacontext_imported(train_base_dir, tmp_path):
    flags = TINY + ["--num-iterations=20"]
    run_driver(train_base_dir, tmp_path / "plain", flags + ["--model-tag=plain"])
    run_driver(train_base_dir, tmp_path / "imported", flags + ["--model-tag=imported"],
               extra=["--import=megacontext.variant"])
    plain, imported = read_json(tmp_path / "plain.rank0.json"), read_json(tmp_path / "imported.rank0.json")
    assert plain["modules"] == [] and "megacontext.variant" in imported["modules"]
    assert len(plain["train_losses"]) == 20
    assert plain["train_losses"] == imported["train_losses"]
    a = torch.load(train_base_dir / "base_checkpoints" / "plain" / "model_000020.pt")
    b = torch.load(train_base_dir / "base_checkpoints" / "imported" / "model_000020.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((train_base_dir / "base_checkpoints" / "imported" / "meta_000020.json").read_text())
    assert "variant" not in meta["user_config"] and not any("megacontext" in k for k in meta["user_config"])
    assert not list((train_base_dir / "base_checkpoints" / "imported").glob("mc_*.pt"))


JT1_CONFIG = """
variant: megacontext
device_type: cpu
depth: 2
aspect_ratio: 64
head_dim: 64
max_seq_len: 160
window_pattern: SL
device_batch_size: 2
total_batch_size: 320
num_iterations: 6
warmup_steps: 1
eval_every: -1
core_metric_every: -1
sample_every: -1
model_tag: jt1
megacontext:
  base_model_tag: d2
  gistnet: {n_layer: 1, n_head: 2}
  lr: 0.01
  pooling_mse_steps: 2
  context_tokens: 96
  horizon: 32
  eval_every: 3
  eval_batches: 1
"""


def run_train_config(base, config_text, tmp_path, *overrides):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(config_text)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_COMPILE="0", OMP_NUM_THREADS="1",
               MEGACONTEXT_ARTIFACT_ROOT=str(tmp_path / "artifacts"))
    return subprocess.run([sys.executable, "-m", "nanochat.train", "--config", str(cfg), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def run_log(tmp_path, run_name):
    """The one telemetry file of a run (named <run> or <run>-<timestamp>, see megacontext/telemetry.py)."""
    found = sorted((tmp_path / "artifacts" / "run_logs").glob(f"{run_name}*.jsonl"))
    assert len(found) == 1, f"expected one telemetry file for run {run_name}, found {found}"
    return read_jsonl(found[0])


def test_jt1_trains_every_gistnet_parameter_and_keeps_the_base_frozen(train_base_dir, tmp_path):
    r = run_train_config(train_base_dir, JT1_CONFIG, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "JT1 val ΔNLL@H lod1" in r.stdout
    out = train_base_dir / "base_checkpoints" / "jt1"
    base_weights = torch.load(train_base_dir / "base_checkpoints" / "d2" / "model_000040.pt")
    after = torch.load(out / "model_000006.pt")
    assert all(torch.equal(base_weights[k], after[k]) for k in base_weights), "the base model must stay frozen"

    from megacontext.gistnet import GistNet, GistNetConfig
    mc = torch.load(out / "mc_000006.pt")
    assert mc["step"] == 6 and mc["identity"].startswith("gistnet-attention")
    init = GistNet(GistNetConfig(**mc["gistnet"]["config"])).init_weights(seed=0).state_dict()
    trained = mc["gistnet"]["state_dict"]
    assert trained.keys() == init.keys()
    # windows this short train LOD1 only: the separate LOD2 weights stay at init, everything else moves
    unchanged = [k for k in init if torch.equal(init[k], trained[k])]
    assert unchanged == [k for k in init if k.startswith("levels.1.")] and len(unchanged) < len(init)

    records = run_log(tmp_path, "jt1")
    steps = [r for r in records if "step" in r]
    assert [r["phase"] for r in steps] == ["pooling_mse"] * 2 + ["delta_nll"] * 4
    assert "val_delta_lod1" in steps[2] and "val_delta_drop" in steps[5]


def test_jt1_resume_restores_gistnet(train_base_dir, tmp_path):
    r = run_train_config(train_base_dir, JT1_CONFIG, tmp_path, "--num_iterations=4", "--save_every=2",
                         "--megacontext.eval_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    out = train_base_dir / "base_checkpoints" / "jt1"
    full = torch.load(out / "mc_000004.pt")
    (out / "mc_000004.pt").unlink()
    r = run_train_config(train_base_dir, JT1_CONFIG, tmp_path, "--num_iterations=4", "--save_every=2",
                         "--megacontext.eval_every=0", "--resume_from_step=2")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = torch.load(out / "mc_000004.pt")
    assert resumed["step"] == 4
    for k, v in full["gistnet"]["state_dict"].items():  # bit-identical on CPU, like a vanilla resume
        assert torch.equal(v, resumed["gistnet"]["state_dict"][k]), k


@pytest.mark.parametrize("edit, message", [
    (("  base_model_tag: d2\n", ""), "megacontext.base_model_tag is required"),
    (("  context_tokens: 96\n", "  context_tokens: 100\n"), "must be a multiple of 32"),
    (("  horizon: 32\n", "  horizon: 32\n  budget: 3\n"), "unknown megacontext config key"),
    (("depth: 2\n", "depth: 3\n"), "does not match base checkpoint"),
])
def test_jt1_bad_config_is_one_clear_line(train_base_dir, tmp_path, edit, message):
    r = run_train_config(train_base_dir, JT1_CONFIG.replace(*edit), tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]


def test_pooling_warmup_leaves_a_head_that_starts_at_the_mean_where_it_is(train_base_dir, tmp_path):
    # the attention head starts exactly at the mean pool, the warm-up's target: Adam must not push it off
    r = run_train_config(train_base_dir, JT1_CONFIG, tmp_path, "--num_iterations=2", "--megacontext.eval_every=0")
    assert r.returncode == 0, r.stderr[-3000:]
    from megacontext.gistnet import GistNet, GistNetConfig
    mc = torch.load(train_base_dir / "base_checkpoints" / "jt1" / "mc_000002.pt")
    init = GistNet(GistNetConfig(**mc["gistnet"]["config"])).init_weights(seed=0).state_dict()
    moved = [k for k, v in mc["gistnet"]["state_dict"].items() if not torch.equal(v, init[k])]
    assert moved == [], f"the pooling warm-up moved {moved}"
    assert mc["trained_levels"] == [1]


LONGDOC_SECTION = """
data:
  source: longdocs
  sources: [pydoc]
  mixture: {natural: 0.5, passkey: 0.5}
"""


def test_jt1_on_long_document_rows_reads_past_the_bos(train_base_dir, tmp_path):
    config = JT1_CONFIG.replace("  eval_every: 3\n", "  eval_every: 3\n  long_documents: true\n") + LONGDOC_SECTION
    r = run_train_config(train_base_dir, config, tmp_path, "--num_iterations=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Data: long documents (pydoc" in r.stdout and "JT1 val ΔNLL@H lod1" in r.stdout
    records = [x for x in run_log(tmp_path, "jt1") if "step" in x]
    assert len(records) == 4 and all(math.isfinite(x["loss"]) for x in records)
    # a window that does not fit the row once the BOS takes its place is one clear line
    bad = config.replace("  context_tokens: 96\n", "  context_tokens: 160\n")
    r = run_train_config(train_base_dir, bad, tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "lower megacontext.context_tokens" in r.stderr


def test_jt1_scores_the_horizon_tokens_the_rows_supervise():
    # the horizon mask is the trainer's supervision (y != -1) of the horizon tokens, BOS row or not
    from megacontext.gistnet import GistNet, GistNetConfig
    from megacontext.variant import MegaContextVariant
    C, H = 64, 8
    variant = MegaContextVariant({"base_model_tag": "x", "context_tokens": C, "horizon": H, "long_documents": True,
                                  "pooling_mse_steps": 0})
    rows = torch.arange(3 * (1 + C + H + 4)).view(3, -1)
    x, y = rows[:, :-1], rows[:, 1:].clone()
    y[1, :] = -1
    y[1, C:C + 3] = rows[1, C + 1:C + 4]  # row 1: a synthetic row whose answer is the horizon's first 3 tokens
    y[2, :] = -1                          # row 2: its answer lies elsewhere
    windows, mask, bos = variant._windows(x, y)
    assert bos == 0 and torch.equal(windows, rows[:, 1:1 + C + H])
    assert mask[0].all() and mask[1].tolist() == [True] * 3 + [False] * (H - 3) and not mask[2].any()
    # a micro-batch in which no row scores a horizon token is a zero loss that still reaches GistNet
    variant.gistnet = GistNet(GistNetConfig(n_embd=16, n_layer=1, n_head=2)).init_weights(seed=0)
    loss, metrics = variant.loss(None, (x[2:], y[2:]), step=5)
    assert loss.item() == 0.0 and loss.requires_grad and metrics["rows_unscored"] == 1


def test_jt1_pooling_weight_adds_the_weighted_pooling_mse_to_the_delta_nll():
    # pooling_weight keeps the warm-up's target in the ΔNLL phase: loss(alpha) - loss(0) = alpha * pooling_mse
    from nanochat.gpt import GPT, GPTConfig
    from megacontext.variant import MegaContextVariant
    C, H = 64, 8
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=C + H, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                          window_pattern="L"))
    model.init_weights()
    with torch.no_grad():  # nanochat zero-inits the output projections: give every weight some signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    losses = {}
    for alpha in (0.0, 0.5):
        variant = MegaContextVariant({"base_model_tag": "x", "context_tokens": C, "horizon": H,
                                      "pooling_mse_steps": 0, "pooling_weight": alpha,
                                      "gistnet": {"n_layer": 1, "n_head": 2}})
        variant.build(model, {"model_tag": "jt1_pooling"}, resuming=True)
        with torch.no_grad():  # off the mean pool (where the attention head starts), so pooling_mse > 0
            g = torch.Generator().manual_seed(1)
            for p in variant.gistnet.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        rows = torch.randint(0, 64, (2, C + H + 1), generator=torch.Generator().manual_seed(2))
        calls = []  # GistNet forwards by level: the pooling term reuses the ΔNLL's LOD1 gists
        hook = variant.gistnet.register_forward_pre_hook(lambda module, args: calls.append(args[1]))
        losses[alpha] = variant.loss(None, (rows[:, :-1], rows[:, 1:]), step=3)
        hook.remove()
        assert calls.count(1) == 1, f"alpha={alpha}: GistNet's LOD1 forward ran {calls.count(1)} times in one micro-batch"
    (plain, plain_metrics), (weighted, metrics) = losses[0.0], losses[0.5]
    assert "pooling_mse" not in plain_metrics and metrics["pooling_mse"] > 1e-3
    assert torch.isclose(weighted - plain, torch.tensor(0.5 * metrics["pooling_mse"]), rtol=1e-4, atol=1e-6)
    weighted.backward()
    assert all(p.grad is not None for p in variant.gistnet.parameters() if p.requires_grad)
