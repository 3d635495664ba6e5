"""
Specification of nanochat/loss_eval.py: evaluate_bpb is the summed loss in nats over the
countable targets (real tokens with a non-zero byte length, not the -1 ignore index),
divided by ln(2) times their summed byte length, with both sums reduced over ranks.
"""
import math
import os
import sys
import subprocess
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanochat.loss_eval as loss_eval
from nanochat.loss_eval import evaluate_bpb

V = 7


class BigramModel(nn.Module):
    """Logits depend only on the current token: small enough to check by hand."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(V, V, generator=g))

    def get_device(self):
        return self.table.device

    def forward(self, idx, targets=None, loss_reduction='mean'):
        logits = self.table[idx]
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1, reduction=loss_reduction)


# id 0 plays a special token (0 bytes); the others are 1-4 bytes long
TOKEN_BYTES = torch.tensor([0, 1, 2, 3, 4, 1, 2], dtype=torch.int32)


def hand_bpb(model, batches):
    """The definition, one target at a time in plain Python floats."""
    nats, nbytes = 0.0, 0
    table = model.table.detach().double().tolist()
    for x, y in batches:
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            if yi < 0 or TOKEN_BYTES[yi] == 0:
                continue
            row = table[xi]
            logsumexp = math.log(sum(math.exp(v) for v in row))
            nats += logsumexp - row[yi]
            nbytes += int(TOKEN_BYTES[yi])
    return nats / (math.log(2) * nbytes)


def make_batches(n, B=3, T=5, seed=1, with_ignored=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
        if with_ignored:
            y[0, :2] = -1
            y[2, -1] = -1
        out.append((x, y))
    return out


@pytest.mark.parametrize("with_ignored", [True, False])
def test_matches_hand_computation(with_ignored):
    model = BigramModel()
    batches = make_batches(4, with_ignored=with_ignored)
    got = evaluate_bpb(model, batches, 4, TOKEN_BYTES)
    assert got == pytest.approx(hand_bpb(model, batches), rel=1e-6)


def test_uses_only_the_first_steps_batches():
    model = BigramModel()
    batches = make_batches(5)
    consumed = []

    def gen():
        for b in batches:
            consumed.append(b)
            yield b
    got = evaluate_bpb(model, gen(), 2, TOKEN_BYTES)
    assert len(consumed) == 2
    assert got == pytest.approx(hand_bpb(model, batches[:2]), rel=1e-6)
    assert got != pytest.approx(hand_bpb(model, batches), rel=1e-6)


def test_special_and_ignored_targets_do_not_count():
    model = BigramModel()
    (x, y), = make_batches(1, with_ignored=False)
    base = evaluate_bpb(model, [(x, y)], 1, TOKEN_BYTES)
    # extending the batch with positions whose targets are special (id 0) or ignored (-1) changes nothing
    x2 = torch.cat([x, torch.randint(0, V, (3, 4))], dim=1)
    y2 = torch.cat([y, torch.tensor([[0, -1, 0, -1]] * 3)], dim=1)
    assert evaluate_bpb(model, [(x2, y2)], 1, TOKEN_BYTES) == pytest.approx(base, rel=1e-6)


def test_nothing_countable_is_infinite():
    model = BigramModel()
    x = torch.randint(0, V, (2, 4))
    y = torch.tensor([[0, -1, 0, 0], [-1, -1, 0, -1]])
    assert evaluate_bpb(model, [(x, y)], 1, TOKEN_BYTES) == float('inf')
    assert evaluate_bpb(model, [], 0, TOKEN_BYTES) == float('inf')


def test_running_out_of_batches_is_a_clear_error():
    with pytest.raises(ValueError, match="asked for 3 steps but the batches ran out after 2"):
        evaluate_bpb(BigramModel(), make_batches(2), 3, TOKEN_BYTES)


def test_sums_are_reduced_across_ranks_before_dividing(monkeypatch):
    """Fake a 2-rank group whose other rank contributed known totals."""
    model = BigramModel()
    batches = make_batches(2)
    other_nats, other_bytes = 17.25, 9
    reduced = []

    def fake_all_reduce(tensor, op=None):
        assert op == torch.distributed.ReduceOp.SUM
        reduced.append(tensor.dtype)
        tensor += other_nats if tensor.dtype.is_floating_point else other_bytes
    monkeypatch.setattr(loss_eval.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loss_eval.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(loss_eval.dist, "all_reduce", fake_all_reduce)
    got = evaluate_bpb(model, batches, 2, TOKEN_BYTES)
    assert sorted(map(str, reduced)) == ["torch.float32", "torch.int64"]
    own = hand_bpb(model, batches)
    # recover this rank's nats and bytes from the definition, then add the other rank's
    own_bytes = sum(int(TOKEN_BYTES[yi]) for _, y in batches for yi in y.flatten().tolist() if yi >= 0)
    own_nats = own * math.log(2) * own_bytes
    expected = (own_nats + other_nats) / (math.log(2) * (own_bytes + other_bytes))
    assert got == pytest.approx(expected, rel=1e-6)


def test_gpt_fixture_bpb_matches_upstream_losses(fixture_base_dir, upstream_fixtures):
    """bpb of the upstream checkpoint on upstream's recorded batch, from upstream's per-token losses."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.tokenizer import get_token_bytes
    rec = torch.load(upstream_fixtures / "expected" / "model_forward.pt")
    token_bytes = get_token_bytes(device="cpu")
    model, _, _ = load_model("base", torch.device("cpu"), phase="eval")
    x, y = rec["idx"], rec["targets"]
    y_flat = y.view(-1)
    valid = y_flat >= 0
    nbytes = torch.where(valid, token_bytes[y_flat.clamp(min=0)], 0)
    expected = (rec["loss_none"].double() * (nbytes > 0)).sum().item() / (math.log(2) * nbytes.sum().item())
    got = evaluate_bpb(model, [(x, y)], 1, token_bytes)
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_real_two_rank_gloo_group(tmp_path):
    """Two processes, each with half of the batches, agree with one process over all of them."""
    script = textwrap.dedent(f"""
        import os, sys, torch, torch.distributed as dist
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_loss_eval import BigramModel, make_batches, TOKEN_BYTES
        from nanochat.loss_eval import evaluate_bpb
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        batches = make_batches(4)[rank * 2:(rank + 1) * 2]
        bpb = evaluate_bpb(BigramModel(), batches, 2, TOKEN_BYTES)
        print(f"RESULT {{rank}} {{bpb!r}}")
        dist.destroy_process_group()
    """)
    path = tmp_path / "worker.py"
    path.write_text(script)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
        procs.append(subprocess.Popen([sys.executable, str(path)], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    values = [float(line.split()[2]) for out in outs for line in out.splitlines() if line.startswith("RESULT")]
    model = BigramModel()
    assert len(values) == 2 and values[0] == values[1]
    assert values[0] == pytest.approx(hand_bpb(model, make_batches(4)), rel=1e-6)
