"""Specification of megacontext/gistnet.py: shapes and dtypes for every head and level, the
initial function of each head (mean pool, identity-initialised mean_linear, attention starting
at norm(mean)), order sensitivity, shared vs per-level weights, seeded determinism, the
identity fingerprint, and token_embeddings being exactly what GPT.forward feeds its blocks."""
from dataclasses import asdict

import pytest
import torch

from megacontext.gistnet import GistNet, GistNetConfig, token_embeddings
from megacontext.storage import gistnet_id
from nanochat.gpt import GPT, GPTConfig, norm

D = 64


def make_gistnet(head="attention", shared=False, seed=0, n_layer=2):
    config = GistNetConfig(n_embd=D, n_layer=n_layer, n_head=4, head=head, shared_levels=shared)
    return GistNet(config).init_weights(seed=seed)


def perturb(gistnet, seed=123, std=0.05):
    """Give every parameter some random offset, so the zero-initialised projections stop hiding
    the parts of the network behind them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gistnet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return gistnet


def small_gpt(seed=0):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=D))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


@pytest.mark.parametrize("head", ["attention", "mean", "mean_linear"])
@pytest.mark.parametrize("level", [1, 2])
def test_output_shape_and_dtype(head, level):
    x = torch.randn(5, 32, D)
    out = make_gistnet(head)(x, level)
    assert out.shape == (5, D) and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_mean_head_is_plain_mean_and_has_no_weights():
    net = make_gistnet("mean")
    x = torch.randn(3, 32, D)
    assert net.num_params() == 0
    assert torch.equal(net(x, 1), x.mean(dim=1))
    assert torch.equal(net(x, 2), x.mean(dim=1))


def test_mean_linear_starts_as_identity_then_learns_something_else():
    net = make_gistnet("mean_linear")
    x = torch.randn(3, 32, D)
    torch.testing.assert_close(net(x, 1), x.mean(dim=1), rtol=0, atol=1e-6)
    perturb(net)
    assert (net(x, 1) - x.mean(dim=1)).abs().max() > 1e-3


def test_untrained_attention_head_is_normed_mean_pool():
    # zero-init output projections + identity out_proj + zero slot query: the mean-pool baseline
    net = make_gistnet("attention")
    x = norm(torch.randn(4, 32, D))
    for level in (1, 2):
        torch.testing.assert_close(net(x, level), norm(x.mean(dim=1)), rtol=0, atol=1e-5)


def test_attention_output_is_normed_like_token_embeddings():
    net = perturb(make_gistnet("attention"))
    out = net(torch.randn(6, 32, D) * 3.0, 1)
    rms = out.pow(2).mean(dim=-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-3)


def test_attention_gist_depends_on_token_order_but_mean_does_not():
    x = torch.randn(2, 32, D)
    shuffled = x[:, torch.randperm(32, generator=torch.Generator().manual_seed(5))]
    attention = perturb(make_gistnet("attention"))
    assert (attention(x, 1) - attention(shuffled, 1)).abs().max() > 1e-4
    mean = make_gistnet("mean")
    torch.testing.assert_close(mean(x, 1), mean(shuffled, 1))


def test_each_gist_depends_only_on_its_own_block():
    net = perturb(make_gistnet("attention"))
    x = torch.randn(3, 32, D)
    changed = x.clone()
    changed[1, 7] += 1.0
    a, b = net(x, 1), net(changed, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[1], b[1])


@pytest.mark.parametrize("head", ["attention", "mean_linear"])
def test_shared_levels_use_one_weight_set_split_levels_two(head):
    shared, split = make_gistnet(head, shared=True), make_gistnet(head, shared=False)
    assert 2 * shared.num_params() == split.num_params() > 0
    perturb(shared), perturb(split)
    x = torch.randn(2, 32, D)
    assert torch.equal(shared(x, 1), shared(x, 2))
    assert not torch.equal(split(x, 1), split(x, 2))


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    config = GistNetConfig(n_embd=D, n_layer=2, n_head=4)
    a, b = GistNet(config), GistNet(config)  # (construction itself may draw, like any nn.Linear)
    before = torch.get_rng_state()
    a.init_weights(seed=7), b.init_weights(seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.identity() == b.identity()
    assert make_gistnet(seed=8).identity() != a.identity()


def test_unseeded_init_follows_global_seed():
    config = GistNetConfig(n_embd=D, n_layer=1, n_head=4)
    torch.manual_seed(3)
    a = GistNet(config).init_weights()
    torch.manual_seed(3)
    b = GistNet(config).init_weights()
    assert a.identity() == b.identity()


def test_meta_construction_then_init_matches_direct_construction():
    config = GistNetConfig(n_embd=D, n_layer=2, n_head=4)
    with torch.device("meta"):
        net = GistNet(config)
    net.to_empty(device="cpu")
    net.init_weights(seed=11)
    assert net.identity() == GistNet(config).init_weights(seed=11).identity()


def test_identity_names_architecture_and_tracks_weights():
    net = make_gistnet("attention", seed=1)
    ident = net.identity()
    assert ident.startswith("gistnet-attention-L2-H4-D64-B32-split-")
    assert len(ident.rsplit("-", 1)[1]) == 12
    with torch.no_grad():
        net.levels[1].pos[0, 0] += 1e-3
    assert net.identity() != ident
    assert make_gistnet("mean").identity().startswith("gistnet-mean-D64-B32-")
    assert make_gistnet("mean_linear", shared=True).identity().startswith("gistnet-mean_linear-D64-B32-shared-")
    # the identity is what goes into .ctx headers
    assert gistnet_id(ident) == gistnet_id(make_gistnet("attention", seed=1).identity())
    assert gistnet_id(ident) != gistnet_id(make_gistnet("attention", seed=2).identity())


def test_gradients_reach_gistnet_parameters():
    net = perturb(make_gistnet("attention"))
    net(torch.randn(4, 32, D), 1).pow(3).sum().backward()
    level1 = dict(net.levels[0].named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in level1.values())
    # level 2's weights were not used
    assert all(p.grad is None for p in net.levels[1].parameters())


def test_bad_inputs_raise_clear_errors():
    net = make_gistnet("attention")
    with pytest.raises(ValueError, match="level must be 1"):
        net(torch.randn(2, 32, D), 3)
    with pytest.raises(ValueError, match=r"shape \(N, 32, 64\)"):
        net(torch.randn(2, 31, D), 1)
    with pytest.raises(ValueError, match="token_embeddings"):
        net(torch.zeros(2, 32, D, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="head must be one of"):
        GistNetConfig(n_embd=D, head="max")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GistNetConfig(n_embd=D, n_head=5)


def test_token_embeddings_is_what_the_first_block_receives():
    model = small_gpt()
    ids = torch.randint(0, 512, (2, 40))
    captured = {}

    def grab(module, args):
        captured["x"] = args[0]

    model.transformer.h[0].register_forward_pre_hook(grab)
    model(ids)
    # smear is off at init (smear_lambda = 0), so block 0 sees resid_lambda * x + x0_lambda * x0
    # with x = x0 = the embeddings
    assert model.smear_lambda.item() == 0.0
    emb = token_embeddings(model, ids)
    assert emb.shape == (2, 40, D)
    assert torch.equal(captured["x"], model.resid_lambdas[0] * emb + model.x0_lambdas[0] * emb)
    assert torch.equal(emb, norm(model.transformer.wte(ids)))
    with pytest.raises(ValueError, match="integer token ids"):
        token_embeddings(model, ids.float())


def test_lod1_gists_feed_lod2():
    model = small_gpt()
    net = perturb(make_gistnet("attention"))
    ids = torch.randint(0, 512, (32 * 32,))
    lod1 = net(token_embeddings(model, ids.view(32, 32)), 1)   # 32 blocks -> 32 gists
    lod2 = net(lod1.unsqueeze(0), 2)                           # -> one gist of 1024 tokens
    assert lod1.shape == (32, D) and lod2.shape == (1, D)


def test_untrained_lod2_weights_are_marked_in_the_identity(tmp_path):
    """A JT1 checkpoint that never trained LOD2 (no whole 1024-token span in its windows) gives gists
    whose identity says so, so they are never stored under the trained GistNet's name."""
    from megacontext.ingest import load_gister
    net = GistNet(GistNetConfig(n_embd=64, n_layer=1, n_head=2)).init_weights(seed=0)
    base_identity = net.identity()
    for trained, marked in (([1], True), ([1, 2], False)):
        path = tmp_path / f"mc_{len(trained)}.pt"
        torch.save({"gistnet": {"config": asdict(net.config), "state_dict": net.state_dict()},
                    "trained_levels": trained}, path)
        identity = load_gister(str(path), 64, "cpu").identity()
        assert identity.endswith("-lod2untrained") == marked
        assert identity.startswith(base_identity)
    shared = GistNet(GistNetConfig(n_embd=64, n_layer=1, n_head=2, shared_levels=True)).init_weights(seed=0)
    shared.untrained_levels = (2,)
    assert not shared.identity().endswith("-lod2untrained")  # one set of weights: LOD2 is LOD1's, trained
