"""
scripts/chat_rl.py: a couple of RL steps on the offline GSM8K rows write a chatrl checkpoint
that load_model('rl') reads back; the advantage is reward minus the question's mean reward,
so equal rewards give exactly zero gradients; bad input is one clear line.
"""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from nanochat.optim import MuonAdamW
from scripts import chat_rl
from tasks.gsm8k import GSM8K

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# 2 samples per question, 8 new tokens each, pass@k over one test question
TINY = ["--device-type=cpu", "--device-batch-size=2", "--num-samples=2", "--max-new-tokens=8", "--eval-examples=1"]


@pytest.fixture
def sft_base_dir(upstream_fixtures, tmp_path, monkeypatch):
    """Tokenizer plus the fixture base checkpoint standing in for an SFT model (chatsft_checkpoints/d2)."""
    base = tmp_path / "base"
    shutil.copytree(upstream_fixtures / "tokenizer", base / "tokenizer")
    shutil.copytree(upstream_fixtures / "base_checkpoints" / "d2", base / "chatsft_checkpoints" / "d2")
    for p in base.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(REPO / "tasks" / "fixtures"))
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    monkeypatch.delenv("NANOCHAT_DEBUG", raising=False)
    return base


def alternating_reward(monkeypatch):
    """Make the samples of every question get rewards 0, 1, 0, 1, ...: never all equal."""
    calls = []

    def reward(self, conversation, assistant_response):
        calls.append(assistant_response)
        return float(len(calls) % 2)

    monkeypatch.setattr(GSM8K, "reward", reward)
    return calls


def record_gradients(monkeypatch):
    """Largest |grad| over all parameters at each optimizer step."""
    largest = []
    original_step = MuonAdamW.step

    def step(self, *args, **kwargs):
        largest.append(max(p.grad.abs().max().item() for g in self.param_groups for p in g["params"]))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(MuonAdamW, "step", step)
    return largest


def test_rl_steps_write_a_loadable_checkpoint(sft_base_dir, monkeypatch):
    rewards_asked = alternating_reward(monkeypatch)
    largest_grads = record_gradients(monkeypatch)
    # 5 GSM8K fixture rows // 2 examples per step = 2 steps
    summary = chat_rl.main(TINY + ["--examples-per-step=2"])
    assert summary["num_steps"] == 2
    assert len(rewards_asked) == 2 * 2 * 2  # steps x examples x samples
    assert summary["mean_rewards"] == [0.5, 0.5]
    assert len(summary["losses"]) == 4 and all(math.isfinite(l) for l in summary["losses"])
    assert len(largest_grads) == 2 and all(g > 0 for g in largest_grads)

    ckpt = sft_base_dir / "chatrl_checkpoints" / "d2"
    # saved at the last step (index 1) only, and without optimizer state
    assert {p.name for p in ckpt.iterdir()} == {"model_000001.pt", "meta_000001.json", "manifest_000001.json"}
    meta = json.loads((ckpt / "meta_000001.json").read_text())
    sft_meta = json.loads((sft_base_dir / "chatsft_checkpoints" / "d2" / "meta_000040.json").read_text())
    assert meta == {"model_config": sft_meta["model_config"]}

    from nanochat.checkpoint_manager import load_model
    model, _, _ = load_model("rl", CPU, phase="eval")
    saved = torch.load(ckpt / "model_000001.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    before = torch.load(sft_base_dir / "chatsft_checkpoints" / "d2" / "model_000040.pt")
    assert any(not torch.equal(before[k], saved[k]) for k in saved)


def test_equal_rewards_give_zero_advantage_and_zero_gradient(sft_base_dir, monkeypatch):
    # every sample right: reward 1 everywhere, so reward - mean = 0 and there is nothing to learn
    # (the weights still move a little: AdamW's decoupled weight decay does not need a gradient)
    monkeypatch.setattr(GSM8K, "reward", lambda self, conversation, response: 1.0)
    largest_grads = record_gradients(monkeypatch)
    summary = chat_rl.main(TINY + ["--examples-per-step=5"])  # one step
    assert summary["num_steps"] == 1 and summary["mean_rewards"] == [1.0]
    assert len(summary["losses"]) == 5 and all(l == 0.0 for l in summary["losses"])
    assert largest_grads == [0.0]
    assert (sft_base_dir / "chatrl_checkpoints" / "d2" / "model_000000.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--examples-per-step=16"], "0 training steps: GSM8K train has 5 examples, fewer than --examples-per-step=16"),
    (["--examples-per-step=1", "--num-samples=3"], "--num-samples=3 must be a positive multiple of --device-batch-size=2"),
    (["--examples-per-step=1", "--model-tag=nope"], "chatsft_checkpoints/nope does not exist"),
])
def test_bad_input_is_one_line(sft_base_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        chat_rl.main(TINY + argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
