"""
Specification of scripts/upstream_check.py, the upstream tracking kit.

The fast tests build a small upstream-shaped tree: a copy of our own nanochat/ and
scripts/base_train.py (so every item starts out "same"), then change one thing per item
the way an upstream commit would (a default, a constant in the model, a new file and flag,
an import of a package that is not installed) and check that exactly that is named. The
slow test runs every item against a real upstream checkout given by NANOCHAT_UPSTREAM_DIR
(the tracked commit must come out all "same").
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def make_upstream_tree(root):
    """An upstream-shaped checkout: our nanochat/ and base_train.py, copied."""
    shutil.copytree(REPO / "nanochat", root / "nanochat", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "base_train.py", root / "scripts" / "base_train.py")
    return root


def edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}: the test's mutation no longer applies"
    path.write_text(text.replace(old, new, 1))


def run_check(upstream, *args):
    env = dict(os.environ, NANOCHAT_DEBUG="0")
    res = subprocess.run([sys.executable, "-m", "scripts.upstream_check", "--upstream", str(upstream), "--eager", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return res.returncode, res.stdout.splitlines(), res.stderr


def test_names_each_change_and_compares_what_it_can(tmp_path):
    """One run over a tree with one upstream-style change per item (a torch import per side
    is the cost, so the changes share the run)."""
    up = make_upstream_tree(tmp_path / "up")
    # base_train: a changed default and a new flag; a new file; a model constant; and the
    # dataloader now needs a package that is not installed here
    edit(up / "nanochat" / "train.py", 'parser.add_argument("--depth", type=int, default=20,',
         'parser.add_argument("--depth", type=int, default=24,')
    edit(up / "nanochat" / "train.py", '    parser.add_argument("--model-tag",',
         '    parser.add_argument("--shiny-new-flag", type=int, default=3)\n    parser.add_argument("--model-tag",')
    (up / "nanochat" / "newthing.py").write_text("X = 1\n")
    edit(up / "nanochat" / "gpt.py", "softcap = 15", "softcap = 14")
    edit(up / "nanochat" / "dataloader.py", "\nimport torch\n", "\nimport torch\nimport not_a_package_here_xyz\n")
    out = tmp_path / "out"
    rc, lines, err = run_check(up, "--items", "tokenizer,model_init,model_forward,dataloader,base_train_flags", "--out", str(out))
    assert rc == 1, err
    assert lines[0].startswith(f"upstream: {up}") and lines[1].startswith("ours:")
    assert lines[2:4] == ["tokenizer: same", "model_init: same"]
    assert re.fullmatch(r"model_forward: differs: logits: max \|diff\| \S+ at \(\d+, \d+, \d+\) \(tolerance 0.0001\) \(and \d+ more\)", lines[4]), lines[4]
    assert lines[5:] == [
        "dataloader: cannot compare: upstream: needs package 'not_a_package_here_xyz', which is not installed here (pip install not_a_package_here_xyz)",
        "base_train_flags: differs: flag --depth/default: upstream 24, ours 20 (and 2 more)",
        "upstream-only: nanochat/newthing.py",
        "upstream-only: scripts/base_train.py --shiny-new-flag",
        "upstream_check: 2/5 same, 2 upstream-only",
    ]
    # --out keeps both recordings and logs; neither checkout was written into
    for side in ("upstream", "ours"):
        assert (out / side / "model_init.pkl").is_file() and (out / side / "log.txt").is_file()
    assert (out / "upstream" / "dataloader.error").is_file() and (out / "ours" / "dataloader.pkl").is_file()
    assert sorted(p.name for p in up.iterdir()) == ["nanochat", "scripts"]
    assert not list(up.rglob("__pycache__"))


def test_unchanged_tree_is_all_same_and_exits_zero(tmp_path):
    # base_train_flags reads only source files: no torch, no workspace, so this run is quick
    up = make_upstream_tree(tmp_path / "up")
    rc, lines, err = run_check(up, "--items", "base_train_flags")
    assert lines[2:] == ["base_train_flags: same", "upstream_check: 1/1 same, 0 upstream-only"], err
    assert rc == 0


@pytest.mark.parametrize("layout", ["missing", "empty", "no_scripts"])
def test_not_an_upstream_checkout_is_one_line(tmp_path, layout):
    target = tmp_path / "x"
    if layout != "missing":
        target.mkdir()
    if layout == "no_scripts":
        shutil.copytree(REPO / "nanochat", target / "nanochat")
    rc, lines, err = run_check(target)
    assert rc == 2 and lines == []
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("upstream_check: --upstream") and "checkout" in err


def test_out_dir_must_be_new_or_empty(tmp_path):
    up = make_upstream_tree(tmp_path / "up")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run_check(up, "--items", "base_train_flags", "--out", str(out))
    assert rc == 2 and "is not empty" in err and (out / "keep.txt").read_text() == "mine"


def test_unknown_item_is_refused():
    rc, _, err = run_check(REPO, "--items", "tokenizer,nope")
    assert rc == 2 and "unknown item(s) nope" in err


def test_first_difference_reports_path_and_place():
    import torch
    from scripts.upstream_check import first_difference
    a = {"x": torch.zeros(2, 3), "y": [1, 2, 3], "z": {"k": 1.0}}
    assert first_difference(a, {"x": torch.zeros(2, 3), "y": [1, 2, 3], "z": {"k": 1.0}}, 0.0) is None
    b = {"x": torch.zeros(2, 3), "y": [1, 2, 4], "z": {"k": 1.0}}
    assert first_difference(a, b, 0.0) == "y[2]: upstream 3, ours 4"
    c = {"x": torch.zeros(2, 3).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(0.5)), "y": [1, 2, 3], "z": {"k": 1.0}}
    assert first_difference(a, c, 1e-3) == "x: max |diff| 0.5 at (1, 2) (tolerance 0.001)"
    assert first_difference(a, c, 1.0) is None
    assert first_difference({"t": torch.arange(4)}, {"t": torch.tensor([0, 1, 7, 3])}, 0.0) == "t: first differs at (2,): upstream 2, ours 7"
    assert first_difference({"t": torch.zeros(2)}, {"t": torch.zeros(3)}, 0.0) == "t: upstream tensor(2,) float32, ours tensor(3,) float32"
    assert first_difference({"z": {"k": 1}}, {"z": {}}, 0.0) == "z/k: upstream has it, ours does not"
    assert first_difference({"n": float("nan")}, {"n": 1.0}, 0.0) == "n: upstream nan, ours 1.0"
    assert first_difference({"t": torch.tensor([float("nan")])}, {"t": torch.tensor([0.0])}, 1.0).startswith("t: max |diff| nan")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NANOCHAT_UPSTREAM_DIR"), reason="set NANOCHAT_UPSTREAM_DIR to an upstream checkout")
def test_real_upstream_checkout_is_all_same():
    upstream = Path(os.environ["NANOCHAT_UPSTREAM_DIR"])
    res = subprocess.run([sys.executable, "-m", "scripts.upstream_check", "--upstream", str(upstream)],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    lines = res.stdout.splitlines()
    assert lines[-1] == "upstream_check: 8/8 same, 0 upstream-only", res.stdout + res.stderr[-2000:]
    assert res.returncode == 0
