"""
megacontext/end_to_end.py through nanochat's real training loop: phases, every trainable
MegaContext parameter stepped and saved, bit-identical resume, the NaN guard, refused
resumes, two CPU processes against one, and the pure pieces (phases, argmin targets).
"""
import os
import sys
import argparse
import subprocess

import numpy as np
import pytest
import torch

from nanochat import hooks
from megacontext.end_to_end import EndToEndVariant, check_phases, phase_at, detail_targets
from megacontext.working_context import WorkingContext
from test_variant import train_base_dir, run_train_config, run_log, REPO  # noqa: F401 (fixture)

E2E_CONFIG = """
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
save_every: 3
model_tag: e2e
megacontext:
  base_model_tag: d2
  gistnet_config: {n_layer: 1, n_head: 2}
  lensnet_config: {d_model: 32, n_layer: 1, n_head: 2}
  phases:
    - {name: gist, steps: 2, train: [gistnet]}
    - {name: lens, steps: 2, train: [lensnet]}
    - {name: joint, steps: 2, train: [gistnet, lensnet]}
  budget_tokens: 128
  history_tokens: 224
  min_history: 64
  horizon: 16
  mixture: {natural: 0.5, passkey: 0.5}
  lr_gistnet: 0.01
  lr_lensnet: 0.01
  argmin_margin: 0.0
"""


def mc_state(base, tag, step):
    return torch.load(base / "base_checkpoints" / tag / f"mc_{step:06d}.pt", weights_only=False)


def flat(sd):
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


# -----------------------------------------------------------------------------
# pure pieces


def test_phases_are_checked_and_cycle():
    phases = check_phases([{"name": "gist", "steps": 2, "train": ["gistnet"]},
                           {"name": "lens", "steps": 1, "train": "lensnet"}], 2)
    names = [phase_at(phases, 2, s)[2][0] for s in range(8)]
    assert names == ["gist", "gist", "lens", "gist", "gist", "lens", "lens", "lens"]  # past the end: the last
    assert phase_at(phases, 2, 4)[:2] == (1, 0)
    for bad, message in [([], "non-empty list"), ([{"steps": 2, "train": ["gpt"]}], "must list some of"),
                         ([{"steps": 0, "train": ["base"]}], "positive integer"),
                         ([{"steps": 1, "train": ["base"], "lr": 1}], "keys name, steps, train")]:
        with pytest.raises(ValueError, match=message):
            check_phases(bad, 1)
    with pytest.raises(ValueError, match="unknown megacontext config key"):
        EndToEndVariant({"phases": [{"steps": 1, "train": ["gistnet"]}], "budget": 3})


def test_argmin_targets_point_at_the_detail_of_the_wc_that_lost_least():
    N, W = 320, 128
    recency = WorkingContext.recency(N, W)
    gist = next(k for k, e in enumerate(recency.entries) if e.level > 0)
    best = recency.swap(next(j for j, e in enumerate(recency.entries) if e.level == 0), gist)
    t = detail_targets(recency, best, gain=0.5, margin=0.01)
    assert t.shape == (len(recency),) and t[gist] == pytest.approx(0.5)  # the gist the best WC expanded
    lower = [k for k in range(len(recency)) if t[k] < 0]
    assert lower and all(recency.entries[k].level == 0 for k in lower)  # the block it collapsed to make room
    assert np.all(detail_targets(recency, best, gain=0.005, margin=0.01) == 0)  # under the margin: keep
    assert np.all(detail_targets(recency, recency, gain=0.5, margin=0.01) == 0)


# -----------------------------------------------------------------------------
# through nanochat.train


def test_phases_train_and_save_every_megacontext_parameter(train_base_dir, tmp_path):
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--save-every=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "starts phase 'lens'" in r.stdout and "phase: joint" in r.stdout and "tokens: 864" in r.stdout
    base = torch.load(train_base_dir / "base_checkpoints" / "d2" / "model_000040.pt")
    after = torch.load(train_base_dir / "base_checkpoints" / "e2e" / "model_000006.pt")
    assert all(torch.equal(base[k], after[k]) for k in base), "no phase trains the base: it stays frozen"
    s2, s4, s6 = (mc_state(train_base_dir, "e2e", s) for s in (2, 4, 6))
    g2, g4, g6 = (flat(s["gistnet"]["state_dict"]) for s in (s2, s4, s6))
    l2, l4, l6 = (flat(s["lensnet"]["state_dict"]) for s in (s2, s4, s6))
    # the gist phase (steps 0-1) leaves LensNet alone, the lens phase (2-3) leaves GistNet alone, and over
    # lens + joint every LensNet parameter moves (its zero-initialised output layers need a step before the
    # layers under them get a gradient), over joint every GistNet parameter the LOD1 gists use
    from megacontext.lensnet import LensNet, LensNetConfig
    l0 = flat(mc_state(train_base_dir, "e2e", 2)["lensnet"]["state_dict"])
    fresh = LensNet(LensNetConfig(**s2["lensnet"]["config"])).init_weights(seed=0).state_dict()
    assert all(torch.equal(fresh[k], l0[k]) for k in l0), "the gist phase must not move LensNet"
    assert all(torch.equal(g2[k], g4[k]) for k in g2)
    assert any(not torch.equal(l2[k], l4[k]) for k in l2)
    assert all(not torch.equal(l0[k], l6[k]) for k in l0), [k for k in l0 if torch.equal(l0[k], l6[k])]
    lod1 = [k for k in g4 if k.startswith("levels.0.")]
    assert lod1 and all(not torch.equal(g4[k], g6[k]) for k in lod1), [k for k in lod1 if torch.equal(g4[k], g6[k])]
    assert s6["identity"] == s6["gistnet_identity"] and s6["step"] == 6
    records = [rec for rec in run_log(tmp_path, "e2e") if "phase" in rec]
    assert [rec["phase"] for rec in records] == ["gist"] * 2 + ["lens"] * 2 + ["joint"] * 2
    assert all(np.isfinite(rec["nll_recency"]) for rec in records)


def test_resume_is_bit_identical_and_refuses_other_shapes(train_base_dir, tmp_path):
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    whole = mc_state(train_base_dir, "e2e", 6)
    assert set(whole) == OFF_KEYS and "megaprediction" not in whole["shapes"]  # megaprediction off: the keys as ever
    (train_base_dir / "base_checkpoints" / "e2e" / "mc_000006.pt").unlink()
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--resume-from-step=3")  # mid lens phase
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = mc_state(train_base_dir, "e2e", 6)
    for part in ("gistnet", "lensnet"):
        a, b = flat(whole[part]["state_dict"]), flat(resumed[part]["state_dict"])
        assert all(torch.equal(a[k], b[k]) for k in a), part
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--resume-from-step=3", "--megacontext.budget_tokens=96")
    assert r.returncode == 1 and "MegaContext shapes differ" in r.stderr
    assert "budget_tokens: checkpoint 128 vs run 96" in r.stderr and "Traceback" not in r.stderr


def test_rows_that_do_not_fit_the_model_are_one_line(train_base_dir, tmp_path):
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--megacontext.budget_tokens=192")
    assert r.returncode == 1 and "max_seq_len is 160" in r.stderr and "Traceback" not in r.stderr
    # the full-context replay reads whole rows: 224 + 16 positions do not fit either
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--megacontext.w_full_context=1.0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "w_full_context reads whole rows of history_tokens + horizon = 240 positions" in r.stderr


@pytest.mark.parametrize("key, value, message", [
    ("w_full_context", -0.5, "w_full_context must be a number >= 0"),
    ("w_full_context", "yes", "w_full_context must be a number >= 0"),
    ("full_context_rows", 0, "full_context_rows must be a positive integer or null"),
])
def test_bad_full_context_settings_are_one_line(key, value, message):
    with pytest.raises(ValueError, match=message):
        EndToEndVariant({"phases": [{"steps": 1, "train": ["lora"]}], key: value})


def test_the_full_context_replay_is_each_rows_supervised_nll_and_reaches_the_lora():
    from nanochat.gpt import GPT, GPTConfig
    from megacontext.lora import attach_lora
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=64,
                          window_pattern="L"))
    model.init_weights()
    with torch.no_grad():  # confident predictions, so rows' mean NLLs differ
        model.lm_head.weight.normal_(std=1.0)
    rows = torch.randint(0, 64, (3, 20))
    supervised = torch.zeros(3, 20, dtype=torch.bool)
    supervised[0] = True            # a natural row: every token
    supervised[1, 15:18] = True     # a synthetic row: its answer span only
    supervised[2, 5:19] = True
    variant = EndToEndVariant({"phases": [{"steps": 1, "train": ["lora"]}], "w_full_context": 1.0})
    got = variant._full_context_nll(model, rows, supervised)
    logits = model(rows[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
    per_row = [nll[r][supervised[r, 1:]].mean() for r in range(3)]
    # rows weigh the same whatever their number of supervised tokens (so B rows on one rank and
    # B/2 on each of two give the same step), not tokens
    assert got.item() == pytest.approx(torch.stack(per_row).mean().item(), rel=1e-5)
    assert got.item() != pytest.approx(nll[supervised[:, 1:]].mean().item(), rel=1e-3)
    lora = attach_lora(model, rank=4)
    model.requires_grad_(False)
    lora.requires_grad_(True)
    variant._full_context_nll(model, rows, supervised).backward()
    grads = [p.grad for p in lora.parameters()]
    assert grads and all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


def test_the_full_context_replay_runs_only_in_phases_that_train_the_lora_or_base(train_base_dir, tmp_path):
    phases = "[{name: gist, steps: 1, train: [gistnet]}, {name: lora, steps: 2, train: [lora]}]"
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--num-iterations=3", f"--megacontext.phases={phases}",
                         "--megacontext.history_tokens=128", "--megacontext.w_full_context=1.0",
                         "--megacontext.full_context_rows=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [rec for rec in run_log(tmp_path, "e2e") if "phase" in rec]
    assert [rec["phase"] for rec in records] == ["gist", "lora", "lora"]
    assert "nll_full_context" not in records[0]
    assert all(np.isfinite(rec["nll_full_context"]) for rec in records[1:])
    # tok/s counts what was read: 2 rows x 3 WCs x (1 + 128 + 15) positions, plus one replayed row of 144
    assert records[0]["tokens"] == 864 and all(rec["tokens"] == 864 + 144 for rec in records[1:])


class NaNAtSteps(EndToEndVariant):
    """The end-to-end variant with a NaN loss injected at chosen steps."""

    def __init__(self, config, bad_steps):
        super().__init__(config)
        self.bad_steps = set(bad_steps)

    def loss(self, model, batch, step):
        loss, metrics = super().loss(model, batch, step)
        return (loss * float("nan") if step in self.bad_steps else loss), metrics


def run_in_process(base, tmp_path, monkeypatch, bad_steps, *overrides):
    from nanochat import train as train_lib
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(E2E_CONFIG)
    defaults = vars(train_lib.build_parser().parse_args([]))
    sections = {"data": {}}
    settings, _, variant_config = hooks.load_run_config(str(cfg), hooks.parse_overrides(list(overrides)), defaults,
                                                        sections)
    variant = NaNAtSteps(variant_config, bad_steps)
    return variant, train_lib.train(argparse.Namespace(**settings), variant)


def test_a_nan_step_is_skipped_and_never_reaches_a_checkpoint(train_base_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    variant, summary = run_in_process(train_base_dir, tmp_path, monkeypatch, {2}, "--save-every=2")
    assert variant.nonfinite_skipped == 1 and all(np.isfinite(summary["train_losses"]))
    s2, s4 = mc_state(train_base_dir, "e2e", 2), mc_state(train_base_dir, "e2e", 4)
    for part in ("gistnet", "lensnet"):
        for k, v in flat(s4[part]["state_dict"]).items():
            assert torch.isfinite(v).all(), (part, k)
    # step 2 (lens phase) was skipped, step 3 trained LensNet: it moved, but from finite weights
    assert any(not torch.equal(a, b) for a, b in zip(flat(s2["lensnet"]["state_dict"]).values(),
                                                      flat(s4["lensnet"]["state_dict"]).values()))
    opt = torch.load(train_base_dir / "base_checkpoints" / "e2e" / "optim_000004_rank0.pt", weights_only=False)
    for state in opt["state"].values():
        assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t))


def test_nan_steps_in_a_row_stop_naming_the_last_checkpoint(train_base_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match=r"step 4: .* 2 steps in a row .* step 3"):
        run_in_process(train_base_dir, tmp_path, monkeypatch, {3, 4}, "--save-every=3",
                       "--megacontext.max_nonfinite_steps=2")


@pytest.mark.slow
def test_two_cpu_processes_train_the_same_weights_as_one(train_base_dir, tmp_path):
    one = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--model-tag=one", "--device-batch-size=4",
                           "--total-batch-size=640", "--num-iterations=4")
    assert one.returncode == 0, one.stderr[-3000:]
    cfg = tmp_path / "run.yaml"
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(train_base_dir), NANOCHAT_COMPILE="0", OMP_NUM_THREADS="1",
               MEGACONTEXT_ARTIFACT_ROOT=str(tmp_path / "artifacts2"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "nanochat.train", "--config", str(cfg), "--model-tag=two", "--device-batch-size=2",
                          "--total-batch-size=640", "--num-iterations=4"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = mc_state(train_base_dir, "one", 4), mc_state(train_base_dir, "two", 4)
    for part in ("gistnet", "lensnet"):
        wa, wb = flat(a[part]["state_dict"]), flat(b[part]["state_dict"])
        for k in wa:  # sums in another order; Adam scales that noise up where grads are tiny, so the
            # bound is 1% of one step's change (lr 0.01): measured at most 6e-5
            assert (wa[k] - wb[k]).abs().max() <= 1e-4, f"{part}.{k}: {(wa[k] - wb[k]).abs().max():.2e}"


def test_a_lora_phase_moves_only_the_lora_and_the_harness_reads_it_back(train_base_dir, tmp_path, monkeypatch):
    phases = "[{name: gist, steps: 1, train: [gistnet]}, {name: lora, steps: 3, train: [lora]}]"
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--num-iterations=4", "--save-every=1",
                         f"--megacontext.phases={phases}", "--megacontext.lora={rank: 4, targets: [wte, c_q, c_v]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "LoRA rank 4" in r.stdout
    ckpt = train_base_dir / "base_checkpoints" / "e2e"
    base = torch.load(train_base_dir / "base_checkpoints" / "d2" / "model_000040.pt")
    after = torch.load(ckpt / "model_000004.pt")
    assert after.keys() == base.keys() and all(torch.equal(base[k], after[k]) for k in base)  # upstream's file, untouched
    s1, s4 = mc_state(train_base_dir, "e2e", 1), mc_state(train_base_dir, "e2e", 4)
    assert all(torch.equal(a, b) for a, b in zip(flat(s1["gistnet"]["state_dict"]).values(),
                                                 flat(s4["gistnet"]["state_dict"]).values()))
    lora1, lora4 = flat(s1["lora"]), flat(s4["lora"])
    assert lora1 and all(k.startswith("lora.") for k in lora1)
    assert all(not torch.equal(lora1[k], lora4[k]) for k in lora1 if k.endswith("lora_B")), "every B moves"
    # the harness's loader attaches exactly the saved LoRA; switched off, the model is the base again
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(train_base_dir))
    from nanochat.checkpoint_manager import load_model
    from megacontext.end_to_end import attach_trained_lora
    model, _, _ = load_model("base", torch.device("cpu"), phase="eval", model_tag="e2e", step=4)
    idx = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    plain = model(idx)
    lora, path = attach_trained_lora(model, "e2e")
    assert path.endswith("mc_000004.pt")
    assert all(torch.equal(v, lora4["lora." + k]) for k, v in lora.state_dict().items() if torch.is_tensor(v))
    with lora.disabled():
        assert torch.equal(model(idx), plain)
    assert not torch.equal(model(idx), plain)
    without = tmp_path / "mc_000009.pt"
    torch.save({**s4, "lora": None}, without)  # what a run without a LoRA phase saves
    with pytest.raises(ValueError, match="holds no LoRA"):
        attach_trained_lora(model, str(without))


def test_a_real_corpus_feeds_the_rows_through_the_datasets_loader(upstream_fixtures, tmp_path, monkeypatch):
    import json
    from nanochat.tokenizer import get_tokenizer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(upstream_fixtures))
    tokenizer = get_tokenizer()
    rng = np.random.default_rng(0)
    words = ["river", "stone", "lamp", "winter", "copper", "garden", "signal", "harbor"]
    books = [" ".join(rng.choice(words, 400)) for _ in range(30)]
    path = tmp_path / "books.jsonl"
    path.write_text("".join(json.dumps({"text": t, "title": f"book{i}"}) + "\n" for i, t in enumerate(books)))
    variant = EndToEndVariant({"phases": [{"steps": 1, "train": ["gistnet"]}], "history_tokens": 128, "horizon": 16,
                               "min_history": 64, "mixture": {"natural": 1.0},
                               "corpus": {"path": "json", "data_files": str(path), "name_key": "title"}})
    rows, (supervised, row_ids), state = next(variant.train_loader(tokenizer, 2, 0, "cpu", None))
    assert rows.shape == (2, 1 + 128 + 16) and bool(supervised[:, 1:].all()) and row_ids.tolist() == [0, 1]
    texts = [tokenizer.decode(r[1:].tolist()) for r in rows]
    assert all(any(t.strip() in book for book in books) for t in texts)  # each row is a span of one book


def test_a_base_phase_trains_the_base_model_and_other_phases_leave_it(train_base_dir, tmp_path):
    phases = "[{name: gist, steps: 2, train: [gistnet]}, {name: base, steps: 2, train: [base, gistnet]}]"
    r = run_train_config(train_base_dir, E2E_CONFIG, tmp_path, "--num-iterations=4", "--save-every=2",
                         f"--megacontext.phases={phases}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = train_base_dir / "base_checkpoints" / "e2e"
    base = torch.load(train_base_dir / "base_checkpoints" / "d2" / "model_000040.pt")
    at2, at4 = torch.load(ckpt / "model_000002.pt"), torch.load(ckpt / "model_000004.pt")
    assert all(torch.equal(base[k], at2[k]) for k in base), "the gist phase must not move the base"
    moved = [k for k in base if not torch.equal(at2[k], at4[k])]
    assert "lm_head.weight" in moved and any(".attn.c_q." in k for k in moved)  # Muon and AdamW groups both step


@pytest.mark.slow
def test_the_compiled_model_reads_every_step_without_recompiling(train_base_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(E2E_CONFIG)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(train_base_dir), NANOCHAT_COMPILE="1", OMP_NUM_THREADS="1",
               MEGACONTEXT_ARTIFACT_ROOT=str(tmp_path / "artifacts"), TORCH_LOGS="recompiles")
    r = subprocess.run([sys.executable, "-m", "nanochat.train", "--config", str(cfg), "--num-iterations=6",
                        "--megacontext.phases=[{name: gist, steps: 6, train: [gistnet]}]"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("phase: gist") == 6
    # the fixed-shape WC batch: GPT.forward compiles once and is reused by every later step
    gpt_recompiles = [line for line in r.stderr.splitlines() if "Recompiling function forward" in line and "gpt.py" in line]
    assert not gpt_recompiles, gpt_recompiles


# -----------------------------------------------------------------------------
# MegaPrediction heads (megacontext/megaprediction.py) as an option of the variant

MP = "--megacontext.megaprediction={lod1: 1.0, lod2: 0.5}"
OFF_KEYS = {"gistnet", "identity", "trained_levels", "lensnet", "gistnet_identity", "lora", "shapes", "step",
            "megacontext_config"}


def train_in_process(base, tmp_path, monkeypatch, *overrides):
    """nanochat.train in this process (the corpus is tokenized once for all runs of a test)."""
    import yaml  # noqa: F401 (hooks reads the YAML)
    from nanochat import train as train_lib
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(E2E_CONFIG)
    defaults = vars(train_lib.build_parser().parse_args([]))
    settings, _, variant_config = hooks.load_run_config(str(cfg), hooks.parse_overrides(list(overrides)), defaults,
                                                        {"data": {}})
    variant = EndToEndVariant(variant_config)
    return variant, train_lib.train(argparse.Namespace(**settings), variant)


def test_megaprediction_heads_train_save_and_resume_bit_identically(train_base_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    variant, _ = train_in_process(train_base_dir, tmp_path, monkeypatch, MP, "--model-tag=mp")
    assert {"mp_lod1", "mp_lod2", "mp_cos_lod1", "mp_cos_lod2", "mp_copy_cos_lod1"} <= set(variant.last_metrics)
    # E2E_CONFIG's max_seq_len 160 holds BOS + 128 tokens: the heads read 4 block ends per row
    assert variant.mp_context == 128 and variant.mp_stream.row_tokens == 1 + 128 + 1024
    s3, s6 = mc_state(train_base_dir, "mp", 3), mc_state(train_base_dir, "mp", 6)
    assert set(s6) == OFF_KEYS | {"megaprediction", "megaprediction_config"}
    assert s6["megaprediction_config"]["context_tokens"] == 128 and s6["shapes"]["megaprediction"]["head"] == "mlp"
    from megacontext.megaprediction import MegaPrediction, MegaPredictionConfig
    fresh = MegaPrediction(MegaPredictionConfig(n_embd=128)).init_weights(seed=0).state_dict_prefixed()
    h3, h6 = s3["megaprediction"], s6["megaprediction"]
    assert h6.keys() == fresh.keys() and all(k.startswith("megaprediction.") for k in h6)
    assert all(not torch.equal(fresh[k], h3[k]) for k in fresh), "every head weight moves in the first 3 steps"
    assert all(not torch.equal(h3[k], h6[k]) for k in h3), "and again in the next 3 (heads train in every phase)"
    records = [rec for rec in run_log(tmp_path, "mp") if "phase" in rec]
    assert len(records) == 6 and all(np.isfinite(rec["mp_lod1"]) and np.isfinite(rec["mp_lod2"]) for rec in records)

    (train_base_dir / "base_checkpoints" / "mp" / "mc_000006.pt").unlink()
    train_in_process(train_base_dir, tmp_path / "again", monkeypatch, MP, "--model-tag=mp", "--resume-from-step=3")
    resumed = mc_state(train_base_dir, "mp", 6)
    for part in ("gistnet", "lensnet"):
        a, b = flat(s6[part]["state_dict"]), flat(resumed[part]["state_dict"])
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert all(torch.equal(h6[k], resumed["megaprediction"][k]) for k in h6), "the heads resume bit-identically"
    with pytest.raises(ValueError, match="megaprediction: checkpoint .* vs run None"):
        train_in_process(train_base_dir, tmp_path / "off", monkeypatch, "--model-tag=mp", "--resume-from-step=3")


@pytest.mark.slow
def test_with_megaprediction_on_every_other_module_trains_exactly_as_with_it_off(train_base_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    train_in_process(train_base_dir, tmp_path, monkeypatch, "--model-tag=mp_off")
    train_in_process(train_base_dir, tmp_path / "on", monkeypatch, MP, "--model-tag=mp_on")
    off, on = mc_state(train_base_dir, "mp_off", 6), mc_state(train_base_dir, "mp_on", 6)
    assert set(off) == OFF_KEYS and "megaprediction" not in off["shapes"]
    for part in ("gistnet", "lensnet"):
        a, b = flat(off[part]["state_dict"]), flat(on[part]["state_dict"])
        assert all(torch.equal(a[k], b[k]) for k in a), part
    ckpt = train_base_dir / "base_checkpoints"
    a, b = torch.load(ckpt / "mp_off" / "model_000006.pt"), torch.load(ckpt / "mp_on" / "model_000006.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setting, message", [
    ("[1, 2]", "must be a mapping of settings or null"),
    ("{lod3: 1.0}", "unknown megacontext.megaprediction key"),
    ("{lod1: 0, lod2: 0}", "needs lod1 > 0 or lod2 > 0"),
    ("{lod1: -1}", "lod1 must be a number >= 0"),
    ("{context_tokens: 40}", "positive multiple of 32"),
    ("{head: conv}", "head must be one of mlp, linear"),
])
def test_bad_megaprediction_settings_are_one_line(setting, message):
    import yaml
    with pytest.raises(ValueError, match=message):
        EndToEndVariant({"phases": [{"steps": 1, "train": ["gistnet"]}], "megaprediction": yaml.safe_load(setting)})


def test_the_cpu_megaprediction_config_is_the_recipe_plus_the_heads():
    from nanochat import train as train_lib
    defaults = vars(train_lib.build_parser().parse_args([]))
    load = lambda name: hooks.load_run_config(str(REPO / "configs" / name), {}, defaults, {"data": {}})
    settings, name, section = load("megaprediction_cpu.yaml")
    _, _, recipe = load("megacontext_cpu.yaml")
    variant = EndToEndVariant(section)
    assert name == "megacontext" and variant.mp["lod1"] > 0 and variant.mp["lod2"] > 0
    assert settings["num_iterations"] == section["cycles"] * sum(p["steps"] for p in section["phases"])
    assert settings["model_tag"] not in ("longctx_cpu_megacontext", "longctx_cpu", "longctx_cpu_gistnet")
    same = {k: v for k, v in recipe.items() if k not in ("phases", "cycles")}
    assert {k: section[k] for k in same} == same, "everything but the phase lengths is the recipe's"
