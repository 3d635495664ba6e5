"""Specification of megacontext/losses.py: horizon NLL of packed rows equals the plain
cross-entropy, ΔNLL@H's four NLLs equal hand-built working contexts (LOD1 gists, LOD2 gists on
1024-token spans aligned to the document, dropped blocks), the deltas and recovered fractions
follow DESIGN.md section 6, evaluate_delta_nll averages positions, and the training losses
are differentiable into GistNet only. A slow test trains GistNets on the fixture model."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from megacontext import losses
from megacontext.base_inputs import gist_inputs
from megacontext.gistnet import GistNet, GistNetConfig, token_embeddings
from megacontext.working_context import TensorStore, WorkingContext
from nanochat.gpt import GPT, GPTConfig, norm

D = 64
V = 512


def make_model(sequence_len=1024 + 128):  # holds C = 1088 + H = 32
    """A small random GPT with its zero-initialised projections and smear switched on, so
    positions interact (a fresh init passes nothing between positions)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        m = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=D))
    m.to_empty(device="cpu")
    m.init_weights()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_proj.weight.copy_(torch.randn(block.attn.c_proj.weight.shape, generator=g) * 0.1)
            block.mlp.c_proj.weight.copy_(torch.randn(block.mlp.c_proj.weight.shape, generator=g) * 0.05)
        m.lm_head.weight.copy_(torch.randn(m.lm_head.weight.shape, generator=g) * 0.1)
        m.smear_lambda.fill_(0.5)
    return m


@pytest.fixture(scope="module")
def model():
    """Long enough for a LOD2 span (1024 tokens) plus context and horizon; frozen."""
    return make_model().requires_grad_(False)


@pytest.fixture(scope="module")
def gistnet():
    net = GistNet(GistNetConfig(n_embd=D, n_layer=1, n_head=2)).init_weights(seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


@pytest.fixture(scope="module")
def document():
    return torch.randint(0, V, (1300,), generator=torch.Generator().manual_seed(3))


def horizon_nll_by_hand(model, idx, n_context, horizon, mask=None, vectors=None):
    """Mean NLL of `horizon` predicted from positions n_context-1.. of idx (1-D), plain cross-entropy."""
    idx = idx[None]
    if mask is None:
        logits = model(idx)
    else:
        with gist_inputs(model, mask[None], vectors[None]):
            logits = model(idx)
    H = len(horizon)
    return F.cross_entropy(logits[0, n_context - 1:n_context - 1 + H], horizon).item()


def gisted_row_by_hand(gists, last, horizon):
    """idx/mask/vectors of [gists | last block | horizon minus its last token]."""
    k = len(gists)
    idx = torch.cat([torch.zeros(k, dtype=torch.long), last, horizon[:-1]])
    mask = torch.zeros(len(idx), dtype=torch.bool)
    mask[:k] = True
    vectors = torch.zeros(len(idx), D)
    vectors[:k] = gists
    return idx, mask, vectors


def test_horizon_nll_of_a_token_row_is_plain_cross_entropy(model, document):
    context, horizon = document[:100], document[100:120]
    got = losses.horizon_nll(model, [WorkingContext.uniform(100, 0)], horizon[None], stores=TensorStore(context))
    assert got.shape == (1,)
    want = horizon_nll_by_hand(model, document[:119], 100, horizon)
    assert abs(got.item() - want) < 1e-5


def test_horizon_mask_scores_only_its_tokens(model, document):
    context, horizon = document[:100], document[100:120]
    wc, store = [WorkingContext.uniform(100, 0)], TensorStore(context)
    everything = losses.horizon_nll(model, wc, horizon[None], stores=store)
    all_true = losses.horizon_nll(model, wc, horizon[None], stores=store, horizon_mask=torch.ones(1, 20, dtype=torch.bool))
    assert all_true.item() == pytest.approx(everything.item(), abs=1e-6)
    # one scored token is that token's cross-entropy; two are the mean of the two; none scores 0
    logits = model(document[None, :119])[0]
    per_token = F.cross_entropy(logits[99:119], horizon, reduction="none")
    for picked in ([3], [3, 11], [0, 19]):
        mask = torch.zeros(1, 20, dtype=torch.bool)
        mask[0, picked] = True
        got, n = losses.horizon_nll(model, wc, horizon[None], stores=store, horizon_mask=mask, counts=True)
        assert int(n) == len(picked)
        assert got.item() == pytest.approx(per_token[picked].mean().item(), abs=1e-5)
    none = losses.horizon_nll(model, wc, horizon[None], stores=store, horizon_mask=torch.zeros(1, 20, dtype=torch.bool))
    assert none.item() == 0.0


def test_right_padded_batch_equals_rows_one_by_one(model, document, gistnet):
    gists = gistnet(token_embeddings(model, document[:128].view(4, 32)), 1)
    store = TensorStore(document[:128], gists)
    wcs = [WorkingContext.uniform(96, 0), WorkingContext.from_entries([(1, 0), (1, 1), (1, 2), (0, 3)], 128, None),
           WorkingContext.uniform(96, 0, start=64), WorkingContext.from_entries([(0, 0), (1, 1), (0, 2)], 96, None)]
    horizons = torch.stack([document[200:216]] * 4)
    batched = losses.horizon_nll(model, wcs, horizons, stores=store)
    singles = torch.cat([losses.horizon_nll(model, [wc], horizons[:1], stores=store) for wc in wcs])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)


def test_delta_nll_matches_hand_built_working_contexts(model, gistnet, document):
    t, C, H = 640, 256, 32
    result = losses.delta_nll(model, gistnet, document, t, context_tokens=C, horizon=H)
    context, horizon, last = document[t - C:t], document[t:t + H], document[t - 32:t]
    with torch.no_grad():
        gists = gistnet(token_embeddings(model, context[:-32].view(7, 32)), 1)
        full = horizon_nll_by_hand(model, torch.cat([context, horizon[:-1]]), C, horizon)
        drop = horizon_nll_by_hand(model, torch.cat([last, horizon[:-1]]), 32, horizon)
        idx, mask, vectors = gisted_row_by_hand(gists, last, horizon)
        lod1 = horizon_nll_by_hand(model, idx, 7 + 32, horizon, mask, vectors)
    assert abs(result["nll_full"] - full) < 1e-5
    assert abs(result["nll_drop"] - drop) < 1e-5
    assert abs(result["nll_lod1"] - lod1) < 1e-5
    # C = 256 < 1024: no whole LOD2 span, so LOD2 falls back to LOD1 everywhere
    assert result["nll_lod2"] == result["nll_lod1"]
    # the definitions of section 6
    assert result["delta_lod1"] == pytest.approx(result["nll_lod1"] - result["nll_full"], abs=1e-12)
    assert result["delta_drop"] == pytest.approx(result["nll_drop"] - result["nll_full"], abs=1e-12)
    assert_recovered(result)
    assert len({result["nll_full"], result["nll_lod1"], result["nll_drop"]}) == 3


def assert_recovered(result):
    """recovered = 1 - ΔNLL / ΔNLL_drop where the drop costs something, n/a (NaN) where it does not."""
    for lod in (1, 2):
        if result["delta_drop"] > 0:
            assert result[f"recovered_lod{lod}"] == pytest.approx(1 - result[f"delta_lod{lod}"] / result["delta_drop"], abs=1e-9)
        else:
            assert math.isnan(result[f"recovered_lod{lod}"])


def test_recovered_is_nan_when_dropping_the_old_context_costs_nothing_or_helps():
    for drop, want in ((0.2, 0.75), (0.0, None), (-0.1, None)):
        out = losses._summarize(2.0, 2.05, 2.1, 2.0 + drop)
        if want is None:
            assert math.isnan(out["recovered_lod1"]) and math.isnan(out["recovered_lod2"])
        else:
            assert out["recovered_lod1"] == pytest.approx(want) and out["recovered_lod2"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def metric_at_1088(model, gistnet, document):
    """ΔNLL@H at t = 1088 with C = 1088 (34 blocks: 33 replaced, the last kept as tokens)."""
    return losses.delta_nll(model, gistnet, document, 1088, context_tokens=1088, horizon=32)


def test_lod2_uses_whole_document_aligned_spans(model, gistnet, document, metric_at_1088):
    C, H = 1088, 32
    aligned = metric_at_1088
    with torch.no_grad():
        context, horizon, last = document[:C], document[C:C + H], document[C - 32:C]
        lod1 = gistnet(token_embeddings(model, context[:-32].view(33, 32)), 1)
        lod2 = gistnet(lod1[None, :32], 2)
        # blocks 0..31 form the span [0, 1024): one LOD2 gist, then block 32's LOD1 gist
        gists = torch.cat([lod2, lod1[32:33]])
        idx, mask, vectors = gisted_row_by_hand(gists, last, horizon)
        want = horizon_nll_by_hand(model, idx, 2 + 32, horizon, mask, vectors)
    assert abs(aligned["nll_lod2"] - want) < 1e-5
    assert aligned["nll_lod2"] != aligned["nll_lod1"]
    # one block later the context starts at token 32: no span [1024k, 1024k + 1024) fits whole
    shifted = losses.delta_nll(model, gistnet, document, 1088 + 32, context_tokens=C, horizon=H)
    assert shifted["nll_lod2"] == shifted["nll_lod1"]


def test_lod2_span_starts():
    assert losses.lod2_span_starts(0, 33) == [0]
    assert losses.lod2_span_starts(0, 31) == []
    assert losses.lod2_span_starts(32, 33) == []
    assert losses.lod2_span_starts(31 * 32, 65) == [1, 33]  # blocks 31..95 hold spans 32..63 and 64..95


def test_evaluate_delta_nll_averages_positions(model, gistnet, document):
    C, H = 128, 32
    docs = [document[:400], document[400:700]]
    result = losses.evaluate_delta_nll(model, gistnet, docs, context_tokens=C, horizon=H)
    positions = losses.default_positions(docs, C, H)
    assert positions == [(0, 128), (0, 256), (1, 128), (1, 256)]
    assert result["n_positions"] == 4
    singles = [losses.delta_nll(model, gistnet, docs[d], t, C, H) for d, t in positions]
    for key in ("nll_full", "nll_lod1", "nll_lod2", "nll_drop"):
        assert result[key] == pytest.approx(sum(s[key] for s in singles) / 4, abs=1e-9)
    assert result["delta_lod1"] == pytest.approx(result["nll_lod1"] - result["nll_full"], abs=1e-9)
    assert_recovered(result)
    picked = losses.evaluate_delta_nll(model, gistnet, docs, positions=[(1, 128)], context_tokens=C, horizon=H)
    assert picked["nll_full"] == pytest.approx(singles[2]["nll_full"], abs=1e-9)
    with pytest.raises(ValueError, match="no position to evaluate"):
        losses.evaluate_delta_nll(model, gistnet, [document[:100]], context_tokens=C, horizon=H)


def test_delta_nll_rejects_bad_positions(model, gistnet, document):
    with pytest.raises(ValueError, match="not block-aligned"):
        losses.delta_nll(model, gistnet, document, 530, context_tokens=256)
    with pytest.raises(ValueError, match="needs 512 context tokens"):
        losses.delta_nll(model, gistnet, document, 256)
    with pytest.raises(ValueError, match="valid t"):
        losses.delta_nll(model, gistnet, document, 1280, context_tokens=256)
    with pytest.raises(ValueError, match="multiple of 32"):
        losses.delta_nll(model, gistnet, document, 512, context_tokens=100)
    with pytest.raises(ValueError, match="at least 64"):
        losses.delta_nll(model, gistnet, document, 512, context_tokens=32)


@pytest.mark.parametrize("level", [1, 2])
def test_delta_nll_loss_equals_the_metric_on_the_same_window(model, gistnet, document, metric_at_1088, level):
    t, C, H = 1088, 1088, 32
    metric = metric_at_1088
    loss = losses.delta_nll_loss(model, gistnet, document[t - C:t + H][None], context_tokens=C, level=level,
                                 first_token=t - C)
    assert loss.item() == pytest.approx(metric[f"delta_lod{level}"], abs=1e-5)


def test_delta_nll_loss_with_a_horizon_mask(model, gistnet, document):
    windows = torch.stack([document[:160], document[320:480]])
    plain = losses.delta_nll_loss(model, gistnet, windows, context_tokens=128)
    full_mask = torch.ones(2, 32, dtype=torch.bool)
    assert losses.delta_nll_loss(model, gistnet, windows, context_tokens=128, horizon_mask=full_mask).item() == \
        pytest.approx(plain.item(), abs=1e-6)
    # a mask on the first 4 horizon tokens is the ΔNLL of those tokens alone: the metric on a 4-token horizon
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, :4] = True
    masked = losses.delta_nll_loss(model, gistnet, windows, context_tokens=128, horizon_mask=mask)
    short = losses.delta_nll_loss(model, gistnet, windows[:, :132], context_tokens=128)
    assert masked.item() == pytest.approx(short.item(), abs=1e-5)
    assert masked.item() != pytest.approx(plain.item(), abs=1e-4)


@pytest.mark.parametrize("level", [1, (1, 2)])
def test_delta_nll_loss_with_precomputed_lod1_gists_is_the_same_loss(model, gistnet, document, level):
    C, H = 1088, 32
    windows = torch.stack([document[:C + H], document[64:64 + C + H]])
    lod1, _ = losses.context_gists(model, gistnet, windows[:, :C], lod2=False)
    given = losses.delta_nll_loss(model, gistnet, windows, context_tokens=C, level=level, lod1=lod1)
    own = losses.delta_nll_loss(model, gistnet, windows, context_tokens=C, level=level)
    assert given.item() == pytest.approx(own.item(), abs=1e-6)
    with pytest.raises(ValueError, match=r"lod1 must be the \(B, C/32 - 1, D\)"):
        losses.delta_nll_loss(model, gistnet, windows, context_tokens=C, level=level, lod1=lod1[:, :-1])


def test_delta_nll_loss_trains_gistnet_only(gistnet, document):
    base = make_model(sequence_len=256)
    assert all(p.requires_grad for p in base.parameters())
    windows = torch.stack([document[:160], document[320:480]])
    gistnet.zero_grad(set_to_none=True)
    losses.delta_nll_loss(base, gistnet, windows, context_tokens=128).backward()
    assert all(p.grad is None for p in base.parameters())           # the base model stays frozen
    assert all(p.requires_grad for p in base.parameters())          # and its flags are restored
    grads = [p.grad for p in gistnet.levels[0].parameters()]  # LOD1's weights (LOD2's are unused here)
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    gistnet.zero_grad(set_to_none=True)


def test_contexts_beyond_the_models_sequence_len_are_refused(gistnet, document):
    short = make_model(sequence_len=256)
    with pytest.raises(ValueError, match="needs 287 positions but the model's sequence_len is 256"):
        losses.delta_nll(short, gistnet, document, 512, context_tokens=256, horizon=32)
    with pytest.raises(ValueError, match="sequence_len is 256"):
        losses.delta_nll_loss(short, gistnet, document[:288][None], context_tokens=224, bos=0)
    losses.delta_nll_loss(short, gistnet, document[:256][None], context_tokens=224, bos=0)  # 1 + 255 fits


def test_delta_nll_loss_rejects_bad_windows(model, gistnet, document):
    with pytest.raises(ValueError, match="horizon must be at least 1"):
        losses.delta_nll_loss(model, gistnet, document[:128][None], context_tokens=128)
    with pytest.raises(ValueError, match="level must be 1 or 2"):
        losses.delta_nll_loss(model, gistnet, document[:160][None], context_tokens=128, level=0)
    with pytest.raises(ValueError, match="windows must be"):
        losses.delta_nll_loss(model, gistnet, document[:160], context_tokens=128)


def test_pooling_mse_loss():
    x = torch.randn(5, 32, D)
    mean = GistNet(GistNetConfig(n_embd=D, head="mean"))
    assert losses.pooling_mse_loss(mean(x, 1), x).item() == pytest.approx(0.0, abs=1e-12)
    # compared after norm: the scale of the gist does not matter, its direction does
    assert losses.pooling_mse_loss(7.0 * x.mean(dim=1), x).item() == pytest.approx(0.0, abs=1e-10)
    other = torch.randn(5, D)
    value = losses.pooling_mse_loss(other, x)
    assert value.item() == pytest.approx(F.mse_loss(norm(other), norm(x.mean(dim=1))).item())
    assert value.item() > 0.1
    with pytest.raises(ValueError, match="pooling_mse_loss expects"):
        losses.pooling_mse_loss(other[:4], x)


# -----------------------------------------------------------------------------
# Training on the fixture model


@pytest.mark.slow
@pytest.mark.parametrize("head, lr", [("mean_linear", 1e-2), ("attention", 3e-3)])
def test_training_gistnet_on_fixture_text_reduces_delta_nll(upstream_fixtures, head, lr):
    import pyarrow.parquet as pq
    from nanochat.tokenizer import RustBPETokenizer
    config = GPTConfig(**json.loads((upstream_fixtures / "manifest.json").read_text())["model_config"])
    with torch.device("meta"):
        base = GPT(config)
    base.to_empty(device="cpu")
    base.init_weights()
    base.load_state_dict(torch.load(upstream_fixtures / "base_checkpoints/d2/model_000040.pt"), strict=True)
    base.requires_grad_(False)
    tokenizer = RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))
    texts = pq.read_table(upstream_fixtures / "base_data_climbmix/shard_00001.parquet").column("text").to_pylist()
    stream = torch.tensor([t for doc in tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id()) for t in doc])
    C, H = 96, 32  # the fixture model was trained at sequence_len 160
    windows = stream[:4 * (C + H)].view(4, C + H)

    torch.manual_seed(0)
    net = GistNet(GistNetConfig(n_embd=config.n_embd, n_layer=1, n_head=4, head=head)).init_weights(seed=0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    history = []
    for _ in range(30):
        loss = losses.delta_nll_loss(base, net, windows, context_tokens=C)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    with torch.no_grad():
        final = losses.delta_nll_loss(base, net, windows, context_tokens=C).item()
    assert final < history[0] - 0.01, f"ΔNLL went {history[0]:.4f} -> {final:.4f}: {history}"
