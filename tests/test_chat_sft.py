"""
scripts/chat_sft.py: the packing loader trains exactly the tokens render_conversation marks
(whole conversations, never cropped); the offline fixtures give a valid val set; a short
CPU run from the fixture base checkpoint writes a chatsft checkpoint that load_model('sft')
reads back; bad input is one clear line.
"""
import io
import os
import re
import contextlib
import sys
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nanochat.tokenizer import RustBPETokenizer
from scripts import chat_sft
from scripts.chat_sft import (EpochProgress, build_train_mixture, build_val_mixture, capped,
                              get_lr_multiplier, sft_data_generator_bos_bestfit)
from tasks.mmlu import MMLU

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# the fixture model was pretrained at 160 tokens; 256 fits every fixture conversation
TINY = ["--device-type=cpu", "--max-seq-len=256", "--device-batch-size=2", "--total-batch-size=512",
        "--eval-every=-1", "--eval-tokens=1024", "--chatcore-every=-1"]


def make_base_dir(upstream_fixtures, base):
    """Tokenizer + the d2 base checkpoint: what SFT needs to start."""
    for name in ("tokenizer", "base_checkpoints"):
        shutil.copytree(upstream_fixtures / name, base / name)
    for p in base.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return base


def offline_env(mp, base):
    mp.setenv("NANOCHAT_BASE_DIR", str(base))
    mp.setenv("NANOCHAT_TASK_FIXTURES", str(REPO / "tasks" / "fixtures"))
    mp.setenv("NANOCHAT_COMPILE", "0")
    mp.delenv("NANOCHAT_DEBUG", raising=False)


@pytest.fixture(scope="module")
def sft_run(upstream_fixtures, tmp_path_factory):
    """One short SFT run shared by the checks below: --num-iterations=3 is 2 optimizer steps
    (upstream counts the prefetched batch too)."""
    base = make_base_dir(upstream_fixtures, tmp_path_factory.mktemp("sft") / "base")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        offline_env(mp, base)
        summary = chat_sft.main(TINY + ["--num-iterations=3"])
    print(out.getvalue())
    SFT_RUN_STDOUT.append(out.getvalue())
    return base, summary


SFT_RUN_STDOUT = []  # what sft_run printed, for the log checks


@pytest.fixture
def tokenizer(upstream_fixtures):
    return RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))


@pytest.fixture
def offline_tasks(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(REPO / "tasks" / "fixtures"))

# -----------------------------------------------------------------------------
# The loader


def check_batch_against_renders(inputs, targets, renders, bos):
    """
    Walk every row conversation by conversation. Each segment must be one whole rendered
    conversation, and its targets must be the next token where the render's mask is 1 and
    -1 where it is 0. Whatever follows the last conversation is BOS padding with targets -1.
    Returns the number of conversations seen.
    """
    seen = 0
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist()):
        # the packed row is max_seq_len + 1 tokens; its last token shows only as the last
        # target, and only if it is trained on (None: unknown, matches anything)
        row = row_inputs + [row_targets[-1] if row_targets[-1] != -1 else None]
        fits = lambda ids, pos: len(ids) <= len(row) - pos and all(
            t is None or t == i for t, i in zip(row[pos:pos + len(ids)], ids))
        pos = 0
        while pos < len(row):
            match = max((r for r in renders if fits(r[0], pos)), key=lambda r: len(r[0]), default=None)
            if match is None:
                # padding to the end of the row: all BOS, nothing trained (the target that
                # would predict the first pad from the last real token included)
                assert pos > 0, "a row must start with a whole conversation"
                assert all(t in (bos, None) for t in row[pos:])
                assert all(t == -1 for t in row_targets[pos - 1:])
                break
            ids, mask = match
            assert ids[0] == bos
            for j in range(max(pos, 1), pos + len(ids)):
                expected = ids[j - pos] if mask[j - pos] == 1 else -1
                assert row_targets[j - 1] == expected, (j, ids[j - pos], mask[j - pos])
            seen += 1
            pos += len(ids)
    return seen


def test_loader_trains_exactly_the_rendered_mask(offline_tasks, tokenizer):
    dataset = build_train_mixture(mmlu_epochs=1, gsm8k_epochs=1)
    renders = [tokenizer.render_conversation(dataset[i]) for i in range(len(dataset))]
    assert any(0 in m for _, m in renders) and any(1 in m for _, m in renders)
    progress = EpochProgress()
    loader = sft_data_generator_bos_bestfit(dataset, tokenizer, device_batch_size=2, max_seq_len=256, device=CPU,
                                            progress=progress)
    packed = 0
    for _ in range(12):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (2, 256)
        assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
        packed += check_batch_against_renders(inputs, targets, renders, tokenizer.get_bos_token_id())
        assert (targets != -1).any()
        if progress.last_step:
            break
    # a full epoch ends once every conversation has been packed
    assert progress.last_step and progress.approx_progress >= 1.0
    assert packed >= len(dataset)


def test_loader_num_iterations_sets_progress_and_last_step(offline_tasks, tokenizer):
    dataset = build_val_mixture()
    progress = EpochProgress()
    loader = sft_data_generator_bos_bestfit(dataset, tokenizer, device_batch_size=1, max_seq_len=256, device=CPU,
                                            num_iterations=4, progress=progress)
    seen = []
    for _ in range(4):
        next(loader)
        seen.append((progress.approx_progress, progress.last_step))
    assert seen == [(0.25, False), (0.5, False), (0.75, False), (1.0, True)]


def test_loader_ranks_split_the_conversations(offline_tasks, tokenizer):
    dataset = build_val_mixture()
    renders = [tokenizer.render_conversation(dataset[i])[0] for i in range(len(dataset))]
    first_rows = []
    for rank in range(2):
        loader = sft_data_generator_bos_bestfit(dataset, tokenizer, device_batch_size=1, max_seq_len=256, device=CPU,
                                                ddp_rank=rank, ddp_world_size=2, buffer_size=2)
        inputs, _ = next(loader)
        first_rows.append(inputs[0].tolist())
    # with a buffer of 2, rank r's first row is packed from conversations r and r + 2 only
    for rank, row in enumerate(first_rows):
        mine = [renders[rank], renders[rank + 2]]
        assert any(row[:len(r)] == r for r in mine)
    assert first_rows[0] != first_rows[1]


def test_loader_refuses_rows_no_conversation_fits(offline_tasks, tokenizer):
    loader = sft_data_generator_bos_bestfit(build_val_mixture(), tokenizer, device_batch_size=1, max_seq_len=16,
                                            device=CPU, buffer_size=4)
    with pytest.raises(RuntimeError, match=r"longer than a row of 17 tokens .*raise --max-seq-len"):
        next(loader)


def test_val_mixture_is_capped_to_the_rows_that_exist(offline_tasks):
    val = build_val_mixture()
    # fixture sizes: SmolTalk test 3 rows, MMLU test 4 (stop=5200), GSM8K test 3 (stop=420)
    assert len(val) == 3 + 4 + 3
    assert all(val[i]["messages"] for i in range(len(val)))
    # a stop below the split size is left alone (the real datasets' case)
    assert len(capped(MMLU(subset="all", split="test", stop=2))) == 2
    assert capped(MMLU(subset="all", split="test")).stop is None


def test_lr_schedule_defaults():
    lrm = lambda p: get_lr_multiplier(p, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0)
    assert [lrm(p) for p in (0.0, 0.5, 0.75, 1.0)] == [1.0, 1.0, 0.5, 0.0]
    assert get_lr_multiplier(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5)

# -----------------------------------------------------------------------------
# End to end


def test_sft_step_lines_end_with_an_eta(sft_run):
    step_lines = [line for line in SFT_RUN_STDOUT[-1].splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2
    etas = [line.rsplit("| eta: ", 1)[1] for line in step_lines]
    assert all(re.fullmatch(r"\d+\.\dm", eta) for eta in etas), etas
    assert etas[-1] == "0.0m"  # the last step: nothing left
    assert "\x1b" not in SFT_RUN_STDOUT[-1]


def test_sft_run_writes_a_loadable_checkpoint(sft_run, upstream_fixtures, monkeypatch):
    base, summary = sft_run
    ckpt = base / "chatsft_checkpoints" / "d2"
    assert {p.name for p in ckpt.iterdir()} == {"model_000002.pt", "meta_000002.json", "optim_000002_rank0.pt",
                                                "manifest_000002.json"}
    assert summary["step"] == 2 and summary["checkpoint_dir"] == str(ckpt)
    assert len(summary["train_losses"]) == 2 and all(math.isfinite(l) for l in summary["train_losses"])
    assert math.isfinite(summary["val_bpb"])

    meta = json.loads((ckpt / "meta_000002.json").read_text())
    assert meta["step"] == 2 and meta["val_bpb"] == summary["val_bpb"]
    assert meta["model_config"] == {"sequence_len": 256, "vocab_size": 500, "n_layer": 2, "n_head": 2,
                                    "n_kv_head": 2, "n_embd": 128, "window_pattern": "SL"}
    # user_config is the flags as given: inherited values stay None, as upstream records them
    assert meta["user_config"]["max_seq_len"] == 256 and meta["user_config"]["embedding_lr"] is None

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    from nanochat.checkpoint_manager import load_model
    model, tok, loaded_meta = load_model("sft", CPU, phase="eval")
    assert loaded_meta["step"] == 2 and model.config.sequence_len == 256
    saved = torch.load(ckpt / "model_000002.pt")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # training moved the weights away from the base model
    base_weights = torch.load(upstream_fixtures / "base_checkpoints" / "d2" / "model_000040.pt")
    assert not torch.equal(saved["transformer.h.0.attn.c_q.weight"], base_weights["transformer.h.0.attn.c_q.weight"])


@pytest.mark.parametrize("argv, message", [
    (["--model-tag=d7"], "base_checkpoints/d7 does not exist"),
    (["--total-batch-size=1000"], "--total-batch-size=1000 must be a multiple of"),
])
def test_bad_input_is_one_line(upstream_fixtures, tmp_path, monkeypatch, capsys, argv, message):
    base = make_base_dir(upstream_fixtures, tmp_path / "base")
    offline_env(monkeypatch, base)
    with pytest.raises(SystemExit) as exit_info:
        chat_sft.main(TINY + argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_missing_base_checkpoints_is_one_line(upstream_fixtures, tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    shutil.copytree(upstream_fixtures / "tokenizer", base / "tokenizer")
    offline_env(monkeypatch, base)
    with pytest.raises(SystemExit):
        chat_sft.main(TINY)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "base_checkpoints" in err and "train a model first" in err

# -----------------------------------------------------------------------------
# Slow: optimizer warm start, torchrun, the module entry point


@pytest.mark.slow
def test_optimizer_warm_start_keeps_the_sft_learning_rates(upstream_fixtures, tmp_path, monkeypatch, capsys):
    base = make_base_dir(upstream_fixtures, tmp_path / "base")
    offline_env(monkeypatch, base)
    from nanochat.checkpoint_manager import load_model
    model, _, _ = load_model("base", CPU, phase="train")
    optimizer = model.setup_optimizer()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    for group in optimizer.param_groups:  # what a finished warmdown leaves behind
        group["lr"] = group["initial_lr"] = 1e-9
    torch.save(optimizer.state_dict(), base / "base_checkpoints" / "d2" / "optim_000040_rank0.pt")

    chat_sft.main(TINY + ["--num-iterations=2"])
    assert "Loaded optimizer state from pretrained checkpoint" in capsys.readouterr().out
    sft_state = torch.load(base / "chatsft_checkpoints" / "d2" / "optim_000001_rank0.pt")
    fresh = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0)
    for group, expected in zip(sft_state["param_groups"], fresh.param_groups):
        assert group["initial_lr"] == pytest.approx(expected["lr"] * 0.8)
    # the momentum buffers came along
    assert len(sft_state["state"]) > 0


@pytest.mark.slow
def test_two_cpu_ranks_under_torchrun(upstream_fixtures, tmp_path):
    base = make_base_dir(upstream_fixtures, tmp_path / "base")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_TASK_FIXTURES=str(REPO / "tasks" / "fixtures"),
               NANOCHAT_COMPILE="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scripts.chat_sft", "--", *TINY, "--total-batch-size=1024", "--num-iterations=3"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = base / "chatsft_checkpoints" / "d2"
    assert {"model_000002.pt", "optim_000002_rank0.pt", "optim_000002_rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    # both ranks' shards are in the step's commit (gathered to rank 0 before it wrote the manifest)
    manifest = json.loads((ckpt / "manifest_000002.json").read_text())
    assert manifest["committed"] and manifest["world_size"] == 2
    assert {"optim_000002_rank0.pt", "optim_000002_rank1.pt", "model_000002.pt"} <= set(manifest["files"])


@pytest.mark.slow
def test_module_entry_point_reports_bad_input_in_one_line(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_COMPILE="0", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "scripts.chat_sft", "--device-type=cpu"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "base_checkpoints" in r.stderr
