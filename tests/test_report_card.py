"""
scripts/report_card.py: reads the artifacts and logs a run leaves in its base dir and writes
one markdown table to <base_dir>/report.md; whatever is missing is left out, never a crash.
"""
import json
import os
import time

import pytest

from scripts import report_card

TOK_EVAL_LOG = """
Vocab sizes:
GPT-2: unavailable
Ours: 4096

Our tokenizer:
========================================
Text Type       Bytes    Tokens   Ratio
----------------------------------------
news            1819     455      4.00
code            1000     500      2.00

Comparison with GPT-2:
news 1819 400 4.55 455 4.00
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def checkpoint(base, stage_dir, tag, step, meta):
    write(base / stage_dir / tag / f"model_{step:06d}.pt", "")
    write(base / stage_dir / tag / f"meta_{step:06d}.json", json.dumps(meta))


@pytest.fixture
def run_dir(tmp_path):
    base = tmp_path / "base"
    config = {"sequence_len": 256, "vocab_size": 4096, "n_layer": 4, "n_head": 4, "n_kv_head": 4, "n_embd": 256, "window_pattern": "L"}
    checkpoint(base, "base_checkpoints", "cpu_tiny", 150, {"step": 150, "val_bpb": 1.875, "model_config": config,
                                                           "loop_state": {"total_training_time": 90.0}})
    # the CSV exactly as scripts/base_eval.py writes it
    write(base / "base_eval" / "base_model_000150.csv",
          f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n{'hellaswag':<35}, {0.3:<10.6f}, {0.1:<10.6f}\n"
          f"{'CORE':<35}, {'':<10}, {0.123456:<10.6f}\n")
    checkpoint(base, "chatsft_checkpoints", "cpu_tiny", 12, {"step": 12, "val_bpb": 1.5, "model_config": config})
    write(base / "chat_eval" / "sft_cpu_tiny_000012.json", json.dumps({
        "source": "sft", "model_tag": "cpu_tiny", "step": 12,
        "results": {"ARC-Easy": 0.25, "GSM8K": 0.0}, "chatcore": None}))
    logs = base / "speedrun_logs"
    write(logs / "tok_eval.log", TOK_EVAL_LOG)
    write(logs / "tok_train.log", "Trained on 1,000 chars from 3 docs\nTraining time: 12.34s\n")
    write(logs / "base_eval.log", "train bpb: 1.900000\nval bpb: 1.950000\n")
    write(logs / "chat_sft.log", "step 00012 ...\nTotal training time: 0.50m\nMinimum validation bpb: 1.5000\n")
    return base


def table(markdown):
    """{(stage, metric): value} from the markdown table."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("stage", "---"):
            rows[(cells[0], cells[1])] = cells[2]
    return rows


def test_report_lists_every_stage(run_dir, capsys):
    out_path = report_card.main(["--base-dir", str(run_dir), "--wall-time-s", "300"])
    assert out_path == os.path.join(str(run_dir), "report.md")
    markdown = (run_dir / "report.md").read_text()
    assert markdown in capsys.readouterr().out
    rows = table(markdown)
    assert rows[("tokenizer", "compression, bytes/token (mean of 2 texts)")] == "3.00"
    assert rows[("tokenizer", "training time")] == "12.3s"
    assert rows[("base", "model")] == "cpu_tiny: depth 4, width 256, seq len 256, vocab 4096"
    assert rows[("base", "steps")] == "150"
    assert rows[("base", "val bpb, pretraining data (last training eval)")] == "1.8750"
    assert rows[("base", "training time (excl. first 10 steps)")] == "1.50m"
    assert rows[("base", "train bpb, pretraining data (base_eval)")] == "1.9000"
    assert rows[("base", "val bpb, pretraining data (base_eval)")] == "1.9500"
    assert rows[("base", "CORE")] == "0.1235"
    assert rows[("sft", "steps")] == "12" and rows[("sft", "val bpb, chat data (SFT val mixture)")] == "1.5000"
    assert rows[("sft", "training time (excl. first 10 steps)")] == "0.50m"
    assert rows[("chat eval (sft)", "ARC-Easy accuracy")] == "0.2500"
    assert rows[("chat eval (sft)", "GSM8K accuracy")] == "0.0000"
    assert ("chat eval (sft)", "ChatCORE") not in rows  # not every task was evaluated
    assert rows[("run", "wall-clock time")] == "5.0m"
    # SFT bpb (chat text) sits beside base bpb (corpus text): the card says they differ in data
    assert "Numbers on different text are not comparable." in markdown.split("| run |")[1]


def test_newest_model_tag_wins_unless_one_is_named(run_dir):
    config = {"sequence_len": 64, "vocab_size": 500, "n_layer": 2, "n_embd": 128}
    checkpoint(run_dir, "base_checkpoints", "other", 7, {"step": 7, "model_config": config})
    later = time.time() + 10
    os.utime(run_dir / "base_checkpoints" / "other", (later, later))
    assert table(report_card.render_markdown(report_card.collect(str(run_dir)), ""))[("base", "steps")] == "7"
    rows = table(report_card.render_markdown(report_card.collect(str(run_dir), model_tag="cpu_tiny"), ""))
    assert rows[("base", "steps")] == "150"


def test_empty_base_dir_gives_an_empty_report(tmp_path):
    report_card.main(["--base-dir", str(tmp_path)])
    assert "Nothing to report yet" in (tmp_path / "report.md").read_text()


def test_missing_base_dir_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: base dir .*nope does not exist; pass --base-dir or set NANOCHAT_BASE_DIR$"):
        report_card.main(["--base-dir", str(tmp_path / "nope")])
