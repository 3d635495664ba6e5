"""
The CPU preset's logs, as speedrun.sh writes them (each stage piped through tee): no ANSI
escapes, rustbpe's per-percent progress records folded into one bar, and a progress bar with
an ETA for the stages that take a while (base_eval's samples and bpb; chat_sft's step lines
are checked in tests/test_chat_sft.py). nanochat.common's colours and CUDA_HOME warning are
in tests/test_common.py.

python -m pytest tests/test_quiet_logs.py -q
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.common import Progress

REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Captured:
    """A stream that is not a terminal, like the pipe into tee."""
    def __init__(self, tty=False):
        self.text, self.tty = "", tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def test_progress_in_a_pipe_is_four_plain_lines_with_eta():
    clock, out = Clock(), Captured()
    bar = Progress(40, "bpb val", unit="batches", stream=out, clock=clock)
    for _ in bar.wrap(iter(range(1000))):  # an endless loader: wrap stops at total
        clock.now += 0.5
    bar.close()
    lines = out.text.splitlines()
    assert len(lines) == 4 and "\x1b" not in out.text and "\r" not in out.text
    assert lines[0] == "bpb val: [#####...............] 10/40 batches | 2.22 batches/s | eta 14s"
    assert lines[-1].startswith("bpb val: [####################] 40/40 batches") and "done in 20s" in lines[-1]


def test_progress_on_a_terminal_redraws_one_line():
    clock, out = Clock(), Captured(tty=True)
    bar = Progress(3, "samples", unit="prompts", stream=out, clock=clock)
    for _ in range(3):
        clock.now += 10
        bar.update()
    assert out.text.count("\r") == 3 and out.text.count("\n") == 1 and out.text.endswith("done in 30s\x1b[K\n")


def test_progress_stopped_early_says_so_and_other_ranks_stay_silent(monkeypatch):
    out = Captured()
    bar = Progress(10, "x", stream=out)
    bar.update(2)
    bar.close()
    bar.close()
    assert out.text.count("(stopped)") == 1
    monkeypatch.setenv("RANK", "1")
    out = Captured()
    bar = Progress(2, "x", stream=out)
    bar.update(2)
    bar.close()
    assert out.text == ""


def test_tok_train_folds_rustbpe_progress_into_one_bar(upstream_fixtures, tmp_path):
    base = tmp_path / "base"
    (base / "base_data_climbmix").mkdir(parents=True)
    for shard in (upstream_fixtures / "base_data_climbmix").iterdir():
        (base / "base_data_climbmix" / shard.name).write_bytes(shard.read_bytes())
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab-size=600", "--max-chars=200000"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    assert "Starting merge loop" in log  # rustbpe's other records still come through
    assert "Progress:" not in log and "Last merge" not in log
    bars = [line for line in log.splitlines() if line.startswith("BPE merges: [")]
    assert 1 <= len(bars) <= 4 and re.search(r"\] (\d+)/\1 merges .*done in", bars[-1]), bars
    assert "\x1b" not in log


def test_base_eval_shows_progress_for_samples_and_bpb(fixture_base_dir, monkeypatch, capsys):
    from scripts import base_eval
    monkeypatch.setattr(sys, "argv", ["base_eval", "--eval=bpb,sample", "--model-tag=d2", "--device-batch-size=2",
                                      "--split-tokens=1280", "--device-type=cpu"])
    base_eval.main()
    out = capsys.readouterr().out
    for name, total in (("samples", 8), ("bpb train", 4), ("bpb val", 4)):
        lines = [line for line in out.splitlines() if line.startswith(f"{name}: [")]
        assert 1 <= len(lines) <= 4, (name, lines)
        assert f"{total}/{total}" in lines[-1] and "done in" in lines[-1]
        assert all("eta" in line for line in lines[:-1])
    assert re.search(r"^val bpb: \d+\.\d+$", out, re.M)  # upstream's result line, unchanged
    assert "\x1b" not in out
