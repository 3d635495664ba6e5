"""megacontext/lens_targets.py and megacontext/lens_training.py: counterfactual utilities computed in
batches equal the one-at-a-time ones, attention mass is the model's own attention, the JT2 losses
behave, and the `lensnet` variant trains, saves and resumes through nanochat's real training loop."""
import glob
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from megacontext.gistnet import GistNet, GistNetConfig, token_embeddings
from megacontext.lens_targets import (item_store, horizon_nlls, candidates, counterfactual_targets, signed_targets,
                                      attention_probs, attention_mass, attention_targets, lens_losses)
from megacontext.working_context import WorkingContext

REPO = Path(__file__).resolve().parent.parent
D = 32


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=256, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=D,
                              window_pattern="SL"))
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # nanochat zero-initialises its output projections: perturb so that context matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.float().eval()


def make_items(model, n_items=2, seed=0, bos=1):
    g = torch.Generator().manual_seed(seed)
    gistnet = GistNet(GistNetConfig(n_embd=D, n_layer=1, n_head=2)).init_weights(seed=0).eval()
    items = []
    for k in range(n_items):
        n = 180 + 23 * k
        history = torch.randint(0, 128, (n,), generator=g)
        with torch.no_grad():
            lod1 = gistnet(token_embeddings(model, history[:n // 32 * 32].view(-1, 32)), 1).float()
        horizon = torch.randint(0, 128, (16,), generator=g)
        mask = torch.rand(16, generator=g) < 0.7
        for wc in (WorkingContext.recency(n, 96), WorkingContext.random_mix(k, n, 96)):
            items.append(dict(wc=wc, history=history, lod1=lod1, lod2=lod1[:0], horizon=horizon, horizon_mask=mask,
                              bos=bos))
    return items


def test_candidates_are_legal_wcs_one_action_away():
    wc = WorkingContext.recency(300, 128)
    cands = candidates(wc)
    n_gists = int((wc.levels > 0).sum())
    assert [c[0] for c in cands].count("expand") == n_gists
    assert [c[0] for c in cands].count("collapse") == int(wc.collapsible_mask().sum())
    for kind, members, c in cands:
        assert c.cost <= wc.budget and c != wc
        assert abs(c.cost - wc.cost) in (0, 31)
        if kind == "expand":
            i = members[0]
            assert wc.levels[i] > 0 and c.entries[i].level == wc.levels[i] - 1 and c.entries[i].start == wc[i].start
        else:
            assert c.entries[members[0]].level == wc.levels[members[0]] + 1


def per_token_nll(model, item, wc, horizon):
    """Per-token horizon NLL of one WC, from the logits (an independent route to horizon_nlls' loss path)."""
    from megacontext.base_inputs import gist_inputs
    from megacontext.working_context import pack_batch
    batch = pack_batch([wc], item_store(item), horizon[None], n_embd=D, bos_id=item["bos"])
    with torch.no_grad(), gist_inputs(model, batch["gist_mask"], batch["gist_vectors"]):
        logp = torch.log_softmax(model(batch["idx"])[0].float(), -1)
    targets = batch["targets"][0]
    where = (targets >= 0).nonzero().squeeze(1)
    return -logp[where].gather(1, targets[where, None]).squeeze(1)


def test_horizon_nlls_count_only_scored_tokens_and_match_the_per_token_nll():
    from megacontext.losses import horizon_nll
    model = tiny_gpt()
    items = make_items(model)
    wcs, stores = [it["wc"] for it in items], [item_store(it) for it in items]
    bos = items[0]["bos"]
    horizons = torch.stack([it["horizon"] for it in items])
    masks = torch.stack([it["horizon_mask"] for it in items])
    nll = horizon_nlls(model, wcs, stores, horizons, masks, bos, batch_rows=3)
    for k in range(len(wcs)):
        expected = per_token_nll(model, items[k], wcs[k], horizons[k])[masks[k]].mean()
        assert nll[k].item() == pytest.approx(expected.item(), abs=1e-5)
    everything = horizon_nlls(model, wcs, stores, horizons, torch.ones_like(masks), bos)
    assert torch.allclose(everything, horizon_nll(model, wcs, horizons, stores=stores, bos_id=bos), atol=1e-5)
    nothing = horizon_nlls(model, wcs[:1], stores[:1], horizons[:1], torch.zeros_like(masks[:1]), bos)
    assert torch.isnan(nothing).all()


def test_batched_counterfactual_utilities_equal_one_candidate_at_a_time():
    model = tiny_gpt(1)
    items = make_items(model, seed=1)
    results = counterfactual_targets(model, items, batch_rows=64)
    for item, result in zip(items, results):
        assert len(result["actions"]) == len(candidates(item["wc"])) > 0
        one = lambda wc: horizon_nlls(model, [wc], [item_store(item)], item["horizon"][None], item["horizon_mask"][None],
                                      item["bos"], batch_rows=1).item()
        base = one(item["wc"])
        assert result["nll"] == pytest.approx(base, abs=1e-5)
        for (kind, members, c), u in zip(result["actions"], result["utilities"]):
            assert u == pytest.approx(base - one(c), abs=1e-5)
        assert np.abs(result["utilities"]).max() > 1e-4, "the tiny model must care about its context"
        t = result["targets"]
        has_action = (item["wc"].levels > 0) | item["wc"].collapsible_mask()
        assert np.isfinite(t[has_action]).all() and np.isnan(t[~has_action]).all()


def test_lookahead_scores_an_expanded_lod2_gist_with_its_picked_child_expanded_too():
    from megacontext.lens_targets import expand_with_room
    model = tiny_gpt(2)
    g = torch.Generator().manual_seed(2)
    gistnet = GistNet(GistNetConfig(n_embd=D, n_layer=1, n_head=2)).init_weights(seed=0).eval()
    n = 1100  # 34 whole blocks and a partial one: blocks 0-31 form one LOD2 span
    history = torch.randint(0, 128, (n,), generator=g)
    with torch.no_grad():
        lod1 = gistnet(token_embeddings(model, history[:34 * 32].view(-1, 32)), 1).float()
        lod2 = gistnet(lod1[None, :32], 2).float()
    wc = WorkingContext.from_entries([(2, 0), (1, 32), (0, 33), (0, 34)], n, 112)
    item = dict(wc=wc, history=history, lod1=lod1, lod2=lod2, horizon=torch.randint(0, 128, (16,), generator=g),
                horizon_mask=torch.ones(16, dtype=torch.bool), bos=1)
    seen = []

    def pick(cand, it, children):
        seen.append(children)
        assert all(cand.entries[j].level == 1 and cand.entries[j].end <= 1024 for j in children)
        return children[9]

    plain = counterfactual_targets(model, [item])[0]
    deep = counterfactual_targets(model, [item], lookahead=pick)[0]
    assert len(seen) == 1 and len(seen[0]) == 32 and deep["lookaheads"] == 1 and plain["lookaheads"] == 0
    one = lambda w: horizon_nlls(model, [w], [item_store(item)], item["horizon"][None], item["horizon_mask"][None],
                                 1, batch_rows=1).item()
    a = next(k for k, (kind, members, _) in enumerate(plain["actions"]) if kind == "expand" and members == (0,))
    expanded = plain["actions"][a][2]
    further = expand_with_room(expanded, seen[0][9])  # 46 -> 77 -> 108 slots of 112
    assert further is not None and further.cost == 108 and further.entries[seen[0][9]].level == 0
    want = max(plain["nll"] - one(expanded), plain["nll"] - one(further))
    assert deep["utilities"][a] == pytest.approx(want, abs=1e-5)
    others = [k for k in range(len(plain["actions"])) if k != a]
    assert np.allclose(deep["utilities"][others], plain["utilities"][others], atol=1e-6)


def test_max_candidates_keeps_a_random_subset():
    model = tiny_gpt()
    items = make_items(model, n_items=1)
    full = counterfactual_targets(model, items)[0]
    some = counterfactual_targets(model, items, max_candidates=2, rng=np.random.default_rng(3))[0]
    assert len(some["actions"]) == 2 and np.isfinite(some["targets"]).sum() <= np.isfinite(full["targets"]).sum()
    by_key = {(a[0], a[1]): u for a, u in zip(full["actions"], full["utilities"])}
    assert all(u == pytest.approx(by_key[(a[0], a[1])], abs=1e-5) for a, u in zip(some["actions"], some["utilities"]))


def test_signed_targets_follow_the_documented_formula():
    actions = [("expand", (0,), None), ("expand", (1,), None), ("collapse", (2,), None), ("collapse", (3,), None)]
    t = signed_targets(5, actions, np.array([0.3, -0.1, -0.05, -0.6]))
    # lam = 0.3: collapsing 2 loses 0.05 < 0.3 -> negative target; collapsing 3 loses 0.6 > 0.3 -> positive
    assert t[:4].tolist() == pytest.approx([0.3, -0.1, -0.25, 0.3])
    assert np.isnan(t[4])
    # an entry with both actions takes the one that gains more
    both = [("expand", (0,), None), ("collapse", (0, 1), None)]
    assert signed_targets(2, both, np.array([-0.2, -0.05])).tolist() == pytest.approx([0.05, 0.05])  # keep
    assert signed_targets(2, both, np.array([-0.2, 0.1])).tolist() == pytest.approx([-0.1, -0.1])  # collapse
    assert signed_targets(2, both, np.array([0.2, -0.5])).tolist() == pytest.approx([0.2, 0.3])


def test_attention_probs_reproduce_every_attention_layer_of_the_model():
    """Probabilities recomputed from the layer's own q, k, times its v, give exactly its output,
    the sliding-window layer (window 128 < T = 200) included."""
    from nanochat.gpt import has_ve
    model = tiny_gpt(2)
    idx = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: seen.append((m, args, out))) for b in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    assert [m.layer_idx for m, _, _ in seen] == [0, 1] and model.window_sizes[0][0] < 200
    for attn, (x, ve, cos_sin, window, _), out in seen:
        probs = attention_probs(attn, x, cos_sin, window)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        B, T, _ = x.shape
        v = attn.c_v(x).view(B, T, attn.n_kv_head, attn.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(attn.ve_gate(x[..., :attn.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, attn.n_kv_head, attn.head_dim)
        y = (probs @ v.transpose(1, 2).float()).transpose(1, 2).reshape(B, T, -1)
        assert torch.allclose(attn.c_proj(y), out, atol=1e-5), f"layer {attn.layer_idx}"
    assert has_ve(1, 2)  # the value-embedding layer is covered


def test_attention_mass_is_a_distribution_over_the_history_and_batches_like_one_row():
    model = tiny_gpt(3)
    g = torch.Generator().manual_seed(1)
    histories = [torch.randint(0, 128, (n,), generator=g) for n in (150, 97)]
    horizons = torch.randint(0, 128, (2, 16), generator=g)
    masks = torch.ones(2, 16, dtype=torch.bool)
    masks[1, :5] = False
    masses = attention_mass(model, histories, horizons, masks, bos=1)
    for k, m in enumerate(masses):
        assert m.shape == (len(histories[k]),) and (m >= 0).all()
        assert m.sum().item() == pytest.approx(1.0, abs=1e-5)
        alone = attention_mass(model, histories[k:k + 1], horizons[k:k + 1], masks[k:k + 1], bos=1)[0]
        assert torch.allclose(alone, m, atol=1e-5)
    # which queries are scored matters
    other = attention_mass(model, histories[1:], horizons[1:], torch.ones(1, 16, dtype=torch.bool), bos=1)[0]
    assert not torch.allclose(other, masses[1], atol=1e-6)


def test_attention_targets_are_log_attention_share_over_token_share():
    wc = WorkingContext.from_entries([(1, 0), (1, 1), (0, 2), (0, 3), (0, 4)], 160, None)
    mass = torch.zeros(160)
    mass[0:32] = 0.6 / 32   # block 0 gets 60% of the attention with 20% of the tokens
    mass[64:96] = 0.001 / 32
    mass[96:] = (1 - 0.601) / 64
    t = attention_targets(wc, mass)
    # entries: LOD1 0, LOD1 1 (expandable), LOD0 2, LOD0 3 (collapsible), the LOD0 tail 4 (no action)
    assert t[0] == pytest.approx(np.log(0.6 / 0.2), rel=1e-4)
    assert t[1] == -3.0 and t[2] == -3.0  # clipped: (almost) no attention
    assert t[3] == pytest.approx(np.log(0.399 / 2 / 0.2), abs=1e-4)
    assert np.isnan(t[4])


def test_lens_losses_reward_the_target_order_and_charge_for_over_budget_expansions():
    wc = WorkingContext.recency(300, 128)  # at 114 of 128: no expansion fits without a collapse
    n = len(wc)
    t = np.linspace(-0.2, 0.3, n).astype(np.float32)
    ordered = torch.as_tensor(t * 10)
    good = lens_losses([ordered], [t], [wc])
    bad = lens_losses([-ordered], [t], [wc])
    assert good["regression"].item() == pytest.approx(0.0, abs=1e-7)
    assert good["ranking"] < bad["ranking"]
    quiet = lens_losses([torch.zeros(n)], [t], [wc])
    assert quiet["budget"].item() == 0.0
    greedy = lens_losses([torch.full((n,), 5.0, requires_grad=True)], [t], [wc])
    assert greedy["budget"].item() > 1.0
    greedy["budget"].backward()
    nan = np.full(n, np.nan, dtype=np.float32)
    assert lens_losses([torch.zeros(n)], [nan], [wc])["regression"].item() == 0.0


# -----------------------------------------------------------------------------
# The variant through nanochat.train


@pytest.fixture
def jt2_base(upstream_fixtures, tmp_path):
    import shutil
    base = tmp_path / "base"
    for sub in ("base_data_climbmix", "tokenizer", "base_checkpoints"):
        shutil.copytree(upstream_fixtures / sub, base / sub)
    return base


def save_gistnet(path, seed=0):
    gistnet = GistNet(GistNetConfig(n_embd=128, n_layer=1, n_head=2)).init_weights(seed=seed)
    torch.save({"gistnet": {"config": asdict(gistnet.config), "state_dict": gistnet.state_dict()},
                "trained_levels": [1]}, path)
    return path


JT2_CONFIG = """
variant: lensnet
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
model_tag: jt2
lensnet:
  base_model_tag: d2
  gistnet: GISTNET
  lensnet: {d_model: 16, n_layer: 1, n_head: 2}
  budget_tokens: 80
  history_tokens: 128
  min_history: 64
  horizon: 32
  long_documents: false
  wcs_per_row: 2
  lr: 0.01
  eval_every: 3
  eval_rows: 2
"""


def run_jt2(base, tmp_path, *overrides, config=JT2_CONFIG, gistnet=None):
    gistnet = gistnet or save_gistnet(tmp_path / "gistnet_mc.pt")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(config.replace("GISTNET", str(gistnet)))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_COMPILE="0", OMP_NUM_THREADS="1",
               MEGACONTEXT_ARTIFACT_ROOT=str(tmp_path / "artifacts"))
    return subprocess.run([sys.executable, "-m", "nanochat.train", "--config", str(cfg), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_jt2_trains_every_lensnet_parameter_and_keeps_base_and_gistnet_frozen(jt2_base, tmp_path):
    from megacontext.ingest import load_gister
    from megacontext.lensnet import LensNet, LensNetConfig
    from megacontext.telemetry import read_jsonl
    r = run_jt2(jt2_base, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "JT2 val focus gain" in r.stdout
    out = jt2_base / "base_checkpoints" / "jt2"
    base_weights = torch.load(jt2_base / "base_checkpoints" / "d2" / "model_000040.pt")
    after = torch.load(out / "model_000006.pt")
    assert all(torch.equal(base_weights[k], after[k]) for k in base_weights), "the base model must stay frozen"
    mc = torch.load(out / "mc_000006.pt")
    assert mc["step"] == 6
    assert mc["gistnet_identity"] == load_gister(str(tmp_path / "gistnet_mc.pt"), 128, "cpu").identity()
    init = LensNet(LensNetConfig(**mc["lensnet"]["config"])).init_weights(seed=0).state_dict()
    trained = mc["lensnet"]["state_dict"]
    assert trained.keys() == init.keys()
    assert [k for k in init if torch.equal(init[k], trained[k])] == [], "every LensNet parameter must be stepped"
    records = [x for x in read_jsonl(glob.glob(str(tmp_path / "artifacts" / "run_logs" / "jt2*.jsonl"))[0])
               if "step" in x]
    assert [x["step"] for x in records] == list(range(6))
    assert all(np.isfinite(x["loss_regression"]) and x["n_wcs"] == 4 for x in records)
    assert "val_focus_gain" in records[2] and "val_loss_ranking" in records[5]


@pytest.mark.slow  # tokenizes the offline long-document corpus (about a minute)
def test_jt2_with_lookahead_trains_on_histories_with_lod2_spans(jt2_base, tmp_path):
    from megacontext.telemetry import read_jsonl
    # rows of 1 + 1088 + 32 tokens, longer than the base's max_seq_len 160, from the variant's own loader
    r = run_jt2(jt2_base, tmp_path, "--num_iterations=2", "--lensnet.row_tokens=1121", "--lensnet.long_documents=true",
                "--lensnet.history_tokens=1088", "--lensnet.min_history=1088", "--lensnet.lookahead=true",
                "--lensnet.budget_tokens=128",
                "--lensnet.eval_every=0", "--lensnet.mixture={natural: 1.0}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [x for x in read_jsonl(glob.glob(str(tmp_path / "artifacts" / "run_logs" / "jt2*.jsonl"))[0])
               if "step" in x]
    assert len(records) == 2 and sum(x["lookaheads"] for x in records) > 0  # LOD2 expansions were looked past


@pytest.mark.slow
def test_jt2_resume_restores_lensnet_bit_identically_and_refuses_another_gistnet(jt2_base, tmp_path):
    args = ("--num_iterations=4", "--save_every=2", "--lensnet.eval_every=0", "--lensnet.ema_decay=0.9")
    r = run_jt2(jt2_base, tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = jt2_base / "base_checkpoints" / "jt2"
    full = torch.load(out / "mc_000004.pt")
    (out / "mc_000004.pt").unlink()
    r = run_jt2(jt2_base, tmp_path, *args, "--resume_from_step=2")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = torch.load(out / "mc_000004.pt")
    assert resumed["step"] == 4 and resumed["gistnet_identity"] == full["gistnet_identity"]
    assert full["ema_updates"] == resumed["ema_updates"] == 4
    for part in ("lensnet", "lensnet_train"):  # the average and the raw weights both resume exactly
        saved = full[part]["state_dict"] if part == "lensnet" else full[part]
        again = resumed[part]["state_dict"] if part == "lensnet" else resumed[part]
        for k, v in saved.items():
            assert torch.equal(v, again[k]), (part, k)
    assert any(not torch.equal(v, full["lensnet_train"][k]) for k, v in full["lensnet"]["state_dict"].items())
    other = save_gistnet(tmp_path / "other_gistnet.pt", seed=5)
    r = run_jt2(jt2_base, tmp_path, *args, "--resume_from_step=2", gistnet=other)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "trained with GistNet" in r.stderr.strip().splitlines()[-1]


def test_weight_average_follows_its_formula_swaps_in_for_eval_and_round_trips():
    from megacontext.lens_training import LensNetVariant
    from megacontext.lensnet import LensNet, LensNetConfig
    variant = LensNetVariant({"ema_decay": 0.5})
    variant.lensnet = LensNet(LensNetConfig(n_embd=D, d_model=16, n_head=2)).init_weights(0)
    variant.gistnet_identity = "g"
    variant._start_ema()
    expected = {k: v.clone() for k, v in variant.lensnet.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    for n in range(4):  # decay = min(0.5, (1 + n) / (10 + n)): 0.1, 0.18, 0.25, 0.31
        with torch.no_grad():
            for p in variant.lensnet.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        variant._update_ema()
        d = min(0.5, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * v for k, v in variant.lensnet.state_dict().items()}
    assert variant.ema_updates == 4
    for k, v in expected.items():
        assert torch.allclose(variant.ema[k], v, atol=1e-6), k
    trained = {k: v.clone() for k, v in variant.lensnet.state_dict().items()}
    with variant._averaged():
        assert all(torch.equal(v, variant.ema[k]) for k, v in variant.lensnet.state_dict().items())
    assert all(torch.equal(v, trained[k]) for k, v in variant.lensnet.state_dict().items())
    state = variant.state_dict()  # readers get the average; the raw weights ride along for a resume
    assert all(torch.equal(v, variant.ema[k]) for k, v in state["lensnet"]["state_dict"].items())
    assert all(torch.equal(v, trained[k]) for k, v in state["lensnet_train"].items())
    other = LensNetVariant({"ema_decay": 0.5})
    other.lensnet = LensNet(LensNetConfig(n_embd=D, d_model=16, n_head=2)).init_weights(1)
    other.gistnet_identity = "g"
    other._start_ema()
    other.load_state_dict(state)
    assert other.ema_updates == 4 and other.step == variant.step
    assert all(torch.equal(v, trained[k]) for k, v in other.lensnet.state_dict().items())
    assert all(torch.equal(v, variant.ema[k]) for k, v in other.ema.items())
    off = LensNetVariant({})
    off.lensnet, off.gistnet_identity = variant.lensnet, "g"
    assert off.ema is None and "lensnet_train" not in off.state_dict()


@pytest.mark.parametrize("config, message", [
    ({"target": "oracle"}, "lensnet.target must be one of"),
    ({"budget": 3}, "unknown lensnet config key(s): budget"),
    ({"budget_tokens": 40}, "lensnet.budget_tokens must be at least 64"),
    ({"min_history": 2000}, "min_history <= history_tokens"),
    ({"ema_decay": 1.0}, "lensnet.ema_decay must be in [0, 1)"),
])
def test_jt2_config_errors_name_the_key(config, message):
    from megacontext.lens_training import LensNetVariant
    with pytest.raises(ValueError) as e:
        LensNetVariant(config)
    assert message in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    (("  base_model_tag: d2\n", ""), "lensnet.base_model_tag is required"),
    (("  gistnet: GISTNET\n", ""), "lensnet.gistnet is required"),
    (("  gistnet: GISTNET\n", "  gistnet: no_such_run\n"), "no GistNet for lensnet.gistnet 'no_such_run'"),
    (("  lr: 0.01\n", "  lr: 0.01\n  target: oracle\n"), "lensnet.target must be one of"),
    (("  history_tokens: 128\n", "  history_tokens: 160\n"), "exceeds the 161 tokens a row holds"),
])
def test_jt2_bad_config_is_one_clear_line(jt2_base, tmp_path, edit, message):
    r = run_jt2(jt2_base, tmp_path, config=JT2_CONFIG.replace(*edit))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]


def test_windows_put_the_horizon_on_a_synthetic_answer_and_keep_natural_rows_at_history_tokens():
    from megacontext.lens_training import LensNetVariant
    v = LensNetVariant({"history_tokens": 64, "min_history": 32, "horizon": 8, "answer_tokens": 3})
    T = 80
    x = torch.arange(T).repeat(2, 1)
    y = torch.arange(1, T + 1).repeat(2, 1)
    y[1, :] = -1
    y[1, 49:59] = 100  # row 1 supervises row tokens 50..59 (its question and answer), then filler
    (h0, z0, m0), (h1, z1, m1) = v._windows(x, y)
    assert torch.equal(h0, torch.arange(1, 65)) and torch.equal(z0, torch.arange(65, 73)) and m0.all()
    assert len(h1) == 56 and torch.equal(z1, torch.arange(57, 65))  # t = span end 60 - 3
    assert m1.tolist() == [True] * 3 + [False] * 5
