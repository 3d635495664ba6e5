"""megacontext/lensnet.py: signed scores per WC entry, illegal actions masked, batching and padding
that change nothing, order handled only through features, and the checkpoint loader."""
import numpy as np
import pytest
import torch

from megacontext.lensnet import (LensNet, LensNetConfig, N_FEATURES, entry_vectors, entry_features, mask_illegal,
                                 load_lensnet, tail_gists_of, lensnet_flops)
from megacontext.working_context import WorkingContext, TensorStore

D = 32


def make_lensnet(seed=0, std=0.3):
    """A LensNet whose zero-initialised branches are perturbed, so its scores are not all 0."""
    lens = LensNet(LensNetConfig(n_embd=D, d_model=16, n_layer=2, n_head=2)).init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in lens.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return lens.eval()


EMB = torch.nn.Embedding(100, D, _weight=torch.randn(100, D, generator=torch.Generator().manual_seed(0)))


def embed_fn(ids):
    with torch.no_grad():
        return EMB(ids)


def history(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_blocks = n // 32
    return TensorStore(torch.randint(0, 100, (n,), generator=g), torch.randn(n_blocks, D, generator=g),
                       torch.randn(n_blocks // 32, D, generator=g))


WCS = [
    (300, WorkingContext.recency(300, 128)),
    (2100, WorkingContext.recency(2100, 256)),
    (2100, WorkingContext.random_mix(3, 2100, 256)),
    (1100, WorkingContext.random_mix(5, 1100, 160)),
]


@pytest.mark.parametrize("n, wc", WCS)
def test_scores_are_one_float32_per_entry_and_masked(n, wc):
    store = history(n)
    lens, tail = make_lensnet(), torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    scores = lens.score_wc(wc, store, embed_fn, tail_gists=tail)
    assert scores.shape == (len(wc),) and scores.dtype == np.float32
    assert (scores[wc.levels == 0] <= 0).all(), "a LOD0 entry can never expand"
    assert (scores[~wc.collapsible_mask()] >= 0).all(), "an entry that cannot collapse is never negative"
    with torch.no_grad():
        raw = lens.score_batch([(entry_vectors(wc, store, embed_fn), entry_features(wc), tail)])[0].numpy()
    legal = np.where(raw > 0, wc.levels > 0, wc.collapsible_mask())
    assert (raw != 0).all() and np.allclose(scores, np.where(legal, raw, 0.0), atol=1e-6)


def test_mask_illegal_keeps_legal_signs_and_zeroes_the_rest():
    wc = WorkingContext.from_entries([(1, 0), (1, 1), (0, 2), (0, 3), (0, 4)], 160, None)
    # entries: two LOD1 gists (expandable, their group is not whole: not collapsible), LOD0 blocks 2, 3
    # (collapsible) and the tail block 4 (neither)
    raw = torch.tensor([0.5, -0.5, 0.7, -0.7, 0.9])
    assert mask_illegal(raw, wc).tolist() == pytest.approx([0.5, 0.0, 0.0, -0.7, 0.0])


def test_batched_scores_equal_one_by_one_with_padding():
    lens = make_lensnet(1)
    items = []
    for k, (n, wc) in enumerate(WCS):
        store = history(n, k)
        tail = None if k == 0 else torch.randn(k * 3, D)
        items.append((entry_vectors(wc, store, embed_fn), entry_features(wc), tail))
    with torch.no_grad():
        batched = lens.score_batch(items)
        for item, b in zip(items, batched):
            alone = lens.score_batch([item])[0]
            assert torch.allclose(alone, b, atol=1e-5)


def test_scores_follow_a_permutation_of_entries_and_ignore_the_order_of_tail_gists():
    lens = make_lensnet(2)
    n, wc = WCS[2]
    store = history(n)
    v, f = entry_vectors(wc, store, embed_fn), entry_features(wc)
    tail = torch.randn(7, D)
    perm = torch.randperm(len(v), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = lens.score_batch([(v, f, tail)])[0]
        permuted = lens.score_batch([(v[perm], f[perm], tail)])[0]
        shuffled_tail = lens.score_batch([(v, f, tail[torch.randperm(7)])])[0]
    assert torch.allclose(permuted, base[perm], atol=1e-5)
    assert torch.allclose(shuffled_tail, base, atol=1e-5)
    assert not torch.allclose(lens.score_batch([(v, f, tail * 3 + 1)])[0], base, atol=1e-3), "tail gists must matter"


def test_entry_vectors_use_gists_then_the_block_gist_then_the_token_mean():
    store = history(300)
    wc = WorkingContext.recency(300, 128)  # LOD1 gists, whole LOD0 blocks, the partial block 9 (tokens 288-300)
    v = entry_vectors(wc, store, embed_fn)
    for k, e in enumerate(wc.entries):
        if e.level == 1 or e.end - e.start == 32:
            assert torch.equal(v[k], store.lod1[e.index])
        else:
            assert torch.allclose(v[k], embed_fn(store.token_ids[e.start:e.end][None])[0].mean(0))
    assert wc.entries[-1].end - wc.entries[-1].start == 12
    # a store without gists (the LOD0 blocks' gists unknown) falls back to the token mean
    plain = WorkingContext.uniform(96, 0)
    v0 = entry_vectors(plain, TensorStore(store.token_ids[:96]), embed_fn)
    assert torch.allclose(v0[1], embed_fn(store.token_ids[32:64][None])[0].mean(0))


def test_features_hold_level_distance_cost_and_refocus_history():
    wc = WorkingContext.from_entries([(1, 0), (0, 1), (0, 2)], 90, None)
    f = entry_features(wc, last_scores=[0.5, -1.0, 0.0], last_change=[3, 0, 1])
    assert f.shape == (3, N_FEATURES)
    assert f[:, :3].tolist() == [[0, 1, 0], [1, 0, 0], [1, 0, 0]]
    assert f[:, 3].tolist() == pytest.approx(np.log1p([58, 26, 0]) / 8)
    assert f[:, 4].tolist() == pytest.approx([1 / 32, 1.0, 26 / 32])
    assert f[:, 5].tolist() == [0.5, -1.0, 0.0]
    assert f[:, 6].tolist() == pytest.approx(np.log1p([3, 0, 1]) / 4)
    with pytest.raises(ValueError, match="last_scores has 2 values but the WC has 3 entries"):
        entry_features(wc, last_scores=[0.0, 1.0])


def test_last_scores_change_the_scores():
    lens = make_lensnet(3)
    n, wc = WCS[0]
    store = history(n)
    a = lens.score_wc(wc, store, embed_fn)
    b = lens.score_wc(wc, store, embed_fn, last_scores=np.ones(len(wc)), last_change=np.full(len(wc), 5))
    assert not np.allclose(a, b)


def test_untrained_lensnet_scores_zero_and_every_parameter_gets_a_gradient_within_a_few_steps():
    lens = LensNet(LensNetConfig(n_embd=D, d_model=16, n_head=2)).init_weights(0)
    n, wc = WCS[1]
    store = history(n)
    item = (entry_vectors(wc, store, embed_fn), entry_features(wc), torch.randn(4, D))
    assert torch.equal(lens.score_batch([item])[0], torch.zeros(len(wc)))
    opt = torch.optim.AdamW(lens.parameters(), lr=1e-2)
    target = torch.randn(len(wc))
    for _ in range(4):  # zero-initialised branches open one after another (head, then each residual output)
        opt.zero_grad()
        ((lens.score_batch([item])[0] - target) ** 2).mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lens.parameters())


def test_tail_gists_are_all_lod2_and_the_last_lod1():
    lod1, lod2 = torch.randn(40, D), torch.randn(2, D)
    tail = tail_gists_of(lod1, lod2, lod1_tail=8)
    assert torch.equal(tail, torch.cat([lod2, lod1[-8:]]))
    assert tail_gists_of(lod1[:0], lod2[:0]) is None


def test_load_lensnet_round_trip_keeps_weights_and_gistnet_identity(tmp_path, monkeypatch):
    lens = make_lensnet(4)
    lens.gistnet_identity = "gistnet-attention-L1-H2-D32-B32-split-0123456789ab"
    from dataclasses import asdict
    run = tmp_path / "base_checkpoints" / "jt2"
    run.mkdir(parents=True)
    state = {"lensnet": {"config": asdict(lens.config), "state_dict": lens.state_dict()},
             "gistnet_identity": lens.gistnet_identity, "step": 7}
    torch.save(state, run / "mc_000003.pt")
    torch.save(state, run / "mc_000007.pt")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    loaded = load_lensnet("jt2", D)
    assert loaded.gistnet_identity == lens.gistnet_identity and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(lens.state_dict().values(), loaded.state_dict().values()))
    n, wc = WCS[0]
    store = history(n)
    assert np.array_equal(loaded.score_wc(wc, store, embed_fn), lens.score_wc(wc, store, embed_fn))
    with pytest.raises(ValueError, match="has n_embd=32 but the base model has 64"):
        load_lensnet(run / "mc_000007.pt", 64)
    torch.save({"gistnet": {}}, tmp_path / "jt1.pt")
    with pytest.raises(ValueError, match="is not a LensNet checkpoint"):
        load_lensnet(tmp_path / "jt1.pt", D)
    with pytest.raises(FileNotFoundError, match="no LensNet checkpoint at nothing_here"):
        load_lensnet("nothing_here", D)


def test_bad_inputs_are_one_clear_line():
    with pytest.raises(ValueError, match="d_model=30 must be divisible by n_head=4"):
        LensNetConfig(n_embd=D, d_model=30, n_head=4)
    lens = make_lensnet()
    n, wc = WCS[0]
    with pytest.raises(ValueError, match=r"tail_gists must be \(G, 32\)"):
        lens.score_wc(wc, history(n), embed_fn, tail_gists=torch.randn(3, 16))


def test_flops_grow_with_entries_and_stay_tiny_next_to_the_weights():
    config = LensNetConfig(n_embd=256, d_model=64, n_layer=2, n_head=4)
    assert lensnet_flops(config, 64, 8) > lensnet_flops(config, 32, 8) > 0


@pytest.mark.parametrize("d_model, n_embd", [(16, 128), (64, 256), (128, 768)])
def test_few_distinct_parameter_shapes(d_model, n_embd):
    # nanochat's AdamW kernel is compiled once per parameter shape, and torch.compile stops at 8
    lens = LensNet(LensNetConfig(n_embd=n_embd, d_model=d_model, n_layer=3, n_head=4))
    assert len({tuple(p.shape) for p in lens.parameters()}) <= 7


def test_refocus_history_features_start_inert():
    lens = LensNet(LensNetConfig(n_embd=D, d_model=16, n_head=2)).init_weights(0)
    with torch.no_grad():
        for p in lens.parameters():
            if p is not lens.feature_proj.weight:
                p.add_(torch.randn(p.shape) * 0.1)
    n, wc = WCS[0]
    store = history(n)
    a = lens.score_wc(wc, store, embed_fn)
    b = lens.score_wc(wc, store, embed_fn, last_scores=np.ones(len(wc)), last_change=np.full(len(wc), 5))
    assert np.array_equal(a, b) and (a != 0).any()


def test_check_gistnet_refuses_gists_of_another_gistnet():
    lens = LensNet(LensNetConfig(n_embd=D, d_model=16, n_head=2), gistnet_identity="gistnet-a-000")
    lens.check_gistnet("gistnet-a-000")
    with pytest.raises(ValueError, match="trained on gists of gistnet-a-000, but the tree's gists come from gistnet-b"):
        lens.check_gistnet("gistnet-b-111")
