"""
Specification of megacontext/megaprediction.py: head shapes, a loss that is zero only at the
target and never trains the target, the hidden state captured is the one the LM head reads,
targets are the GistNet gists of the right future spans (no off-by-one), the copy-last-gist
baseline, lod_mix and the planner, and the mc-file round trip.
"""
import pytest
import torch

from megacontext.gistnet import GistNet, GistNetConfig, token_embeddings
from megacontext.megaprediction import (MegaPrediction, MegaPredictionConfig, Planner, block_end_hidden, capture_hidden,
                                        check_lod_mix, copy_last_gist, load_megaprediction, megaprediction_loss,
                                        span_gists, training_examples)
from nanochat.gpt import GPT, GPTConfig

D = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=128, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=D, window_pattern="L"))
    m.init_weights()
    with torch.no_grad():  # nanochat zero-inits the output projections; give every weight some signal
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def gistnet():
    g = GistNet(GistNetConfig(n_embd=D, n_layer=1, n_head=2)).init_weights(seed=0)
    with torch.no_grad():  # off the mean pool, so neighbouring blocks' gists really differ
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g.eval()


def heads(head="mlp"):
    return MegaPrediction(MegaPredictionConfig(n_embd=D, head=head)).init_weights(seed=0)


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_heads_map_hidden_states_to_gists_per_level(head):
    h = heads(head)
    x = torch.randn(3, 5, D)
    for level in (1, 2):
        assert h(x, level).shape == (3, 5, D) and h(x, level).dtype == torch.float32
    assert not torch.equal(h(x, 1), h(x, 2)), "each level has its own weights"
    assert torch.equal(h(x, 1), heads(head)(x, 1)), "a seeded init is reproducible"
    with pytest.raises(ValueError, match="level must be 1"):
        h(x, 3)
    with pytest.raises(ValueError, match="width 64"):
        h(torch.randn(2, 32), 1)
    with pytest.raises(ValueError, match="head must be one of mlp, linear"):
        MegaPredictionConfig(n_embd=D, head="conv")


def test_loss_is_zero_at_the_target_positive_elsewhere_and_never_trains_the_target():
    target = torch.randn(6, D, requires_grad=True)
    loss, cos = megaprediction_loss(target.detach().clone(), target)
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and torch.allclose(cos, torch.ones(6))
    prediction = torch.randn(6, D, requires_grad=True)
    loss, cos = megaprediction_loss(prediction, target, w_cos=1.0, w_mse=0.5)
    assert float(loss.detach()) > 0.1 and cos.shape == (6,)
    scaled, _ = megaprediction_loss(2 * target.detach(), target, w_cos=1.0, w_mse=0.0)
    assert float(scaled) == pytest.approx(0.0, abs=1e-6), "the cosine term ignores scale"
    scaled, _ = megaprediction_loss(2 * target.detach(), target, w_cos=0.0, w_mse=1.0)
    assert float(scaled) > 0, "the MSE term does not"
    loss.backward()
    assert prediction.grad is not None and target.grad is None, "the target is detached"


def test_the_captured_hidden_state_is_what_the_lm_head_reads(model):
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(idx)
        with capture_hidden(model) as cap:
            again = model(idx)
        assert torch.equal(plain, again), "capturing changes nothing"
        logits = model.lm_head(cap.hidden)[..., :300].float()
        assert torch.allclose(15 * torch.tanh(logits / 15), plain, atol=1e-5)
        where = torch.tensor([3, 17, 39])
        with capture_hidden(model, where) as cap2:
            few = model(idx)
        assert few.shape == (2, 3, 300) and torch.allclose(few, plain[:, where], atol=1e-5)
        assert torch.equal(cap2.hidden, cap.hidden)
    assert not model.lm_head._forward_pre_hooks, "the hook is removed on exit"


def test_targets_are_the_gists_of_the_spans_after_each_block_end(model, gistnet):
    K = 3  # block ends 32, 64, 96 of the read part; 1024 more tokens for the targets
    rows = torch.randint(0, 290, (2, 1 + 32 * K + 1024), generator=torch.Generator().manual_seed(2))
    rows[:, 0] = 299  # BOS
    ex = training_examples(model, gistnet, rows, K)
    assert all(ex[k].shape == (2, K, D) for k in ("hidden", "lod1", "lod2", "copy_lod1", "copy_lod2"))
    assert not ex["copy_lod2_mask"].any(), "no block end here has 1024 tokens before it"
    tokens = rows[:, 1:]
    gist1 = lambda r, b: gistnet(token_embeddings(model, tokens[r, 32 * b:32 * b + 32][None]), 1)[0]
    with torch.no_grad():
        full = None
        with capture_hidden(model) as cap:
            model(rows[:, :1 + 32 * K])
        full = cap.hidden
        for r in range(2):
            for k in range(1, K + 1):  # array row k - 1 is block end k: it has read blocks 0 .. k-1
                assert torch.allclose(ex["hidden"][r, k - 1], full[r, 32 * k].float(), atol=1e-6)
                assert torch.allclose(ex["lod1"][r, k - 1], gist1(r, k), atol=1e-5)       # the NEXT block
                assert not torch.allclose(ex["lod1"][r, k - 1], gist1(r, k - 1), atol=1e-3)  # not the one just read
                assert torch.allclose(ex["copy_lod1"][r, k - 1], gist1(r, k - 1), atol=1e-5)
                lod1 = torch.stack([gist1(r, b) for b in range(k, k + 32)])              # the next 1024 tokens
                assert torch.allclose(ex["lod2"][r, k - 1], gistnet(lod1[None], 2)[0], atol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ 32 x 3 \\+ 1024"):
        training_examples(model, gistnet, rows[:, :-1], K)


def test_block_end_hidden_reads_only_what_came_before(model):
    rows = torch.randint(0, 290, (1, 1 + 64), generator=torch.Generator().manual_seed(3))
    changed = rows.clone()
    changed[0, 33:] = (changed[0, 33:] + 1) % 290  # every token after block end 1
    a, b = block_end_hidden(model, rows, 2), block_end_hidden(model, changed, 2)
    assert torch.equal(a[0, 0], b[0, 0]) and not torch.equal(a[0, 1], b[0, 1])
    model.train()
    block_end_hidden(model, rows, 2)
    assert model.training, "the model's mode is restored"
    model.eval()


def test_copy_last_gist_predicts_each_span_by_the_one_before(model, gistnet):
    lod1 = torch.randn(40, D)
    prediction, target = copy_last_gist(lod1)
    assert torch.equal(prediction[5], lod1[5]) and torch.equal(target[5], lod1[6])  # block 6's gist = block 5's
    prediction, target = copy_last_gist(lod1, 32)
    assert len(prediction) == 8 and torch.equal(prediction[0], lod1[0]) and torch.equal(target[0], lod1[32])
    assert len(copy_last_gist(lod1[:3], 32)[0]) == 0
    tokens = torch.randint(0, 290, (1, 32 * 34), generator=torch.Generator().manual_seed(4))
    g1, g2 = span_gists(model, gistnet, tokens)
    assert g1.shape == (1, 34, D) and g2.shape == (1, 3, D)
    assert torch.allclose(g2[0, 2], gistnet(g1[:, 2:34], 2)[0], atol=1e-6)  # a sliding span of 32 blocks


def test_lod_mix_and_the_planner_place_coarse_before_fine():
    assert check_lod_mix([1]) == (1,) and check_lod_mix([1, 2]) == (2, 1) and check_lod_mix(2) == (2,)
    for bad in ([], [3], [1, 1], None):
        with pytest.raises(ValueError, match="lod_mix lists the levels"):
            check_lod_mix(bad)
    h = heads()
    planner = Planner(h, [1, 2])
    x = torch.randn(4, D)
    plans = planner.plans(x)
    assert planner.slots == 2 and plans.shape == (4, 2, D)
    assert torch.equal(plans[:, 0], h(x, 2)) and torch.equal(plans[:, 1], h(x, 1))


def test_heads_round_trip_through_an_mc_file_and_a_file_without_them_is_refused(tmp_path):
    h = heads()
    with torch.no_grad():
        h.levels[1].c_proj.weight.add_(1.0)
    state = h.state_dict_prefixed()
    assert state and all(k.startswith("megaprediction.") for k in state)
    path = tmp_path / "mc_000007.pt"
    torch.save({"megaprediction": state, "gistnet_identity": "gistnet-x",
                "megaprediction_config": {"n_embd": D, "head": "mlp", "hidden_mult": 2, "context_tokens": 96}}, path)
    loaded, info = load_megaprediction(str(path), D)
    assert info == {"path": str(path), "gistnet_identity": "gistnet-x", "context_tokens": 96}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), h.state_dict().values()))
    assert not loaded.training
    with pytest.raises(ValueError, match="n_embd=64 but the base model has 128"):
        load_megaprediction(str(path), 128)
    torch.save({"gistnet": {}, "step": 3}, tmp_path / "mc_000008.pt")
    with pytest.raises(ValueError, match="holds no MegaPrediction heads"):
        load_megaprediction(str(tmp_path / "mc_000008.pt"), D)
