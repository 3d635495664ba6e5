"""
Specification of megacontext/ingest.py: `python -m megacontext.ingest` builds a tree from text.

End to end on the fixture checkpoint (base d2 step 40, its tokenizer) with the mean gister
and with a saved GistNet: the tree holds BOS + the file's tokens and their gists; --append
continues it; directories are read in order. Pieces cut for tokenization never change the
token ids. Every bad input is one line naming the problem, and leaves the disk as it was.
"""
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacontext import ingest
from megacontext.gistnet import GistNet, GistNetConfig, token_embeddings
from megacontext.tree import MegaContextTree
from nanochat.checkpoint_manager import build_model
from nanochat.tokenizer import RustBPETokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The quick brown fox jumps over the lazy dog.\n  Indented line, numbers 12345.\n\n"
        "Unicode: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e.\r\nTabs\tand 'quotes' don't break it.\n") * 12


def write_config(tmp_path, name="ingest", **overrides):
    cfg = {"source": "base", "model_tag": "d2", "step": 40, "gistnet": "mean", "dtype": "fp16",
           "batch_size": 4, "device_type": "cpu", **overrides}
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in cfg.items() if v is not None))
    return path


def run(*argv):
    return ingest.main([str(a) for a in argv])


@pytest.fixture
def base_model(fixture_base_dir):
    model, tokenizer, _ = build_model(str(fixture_base_dir / "base_checkpoints" / "d2"), 40, torch.device("cpu"), "eval")
    return model, tokenizer


def snapshot(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir()}


# -----------------------------------------------------------------------------
# end to end


def test_ingest_end_to_end_with_the_mean_gister(fixture_base_dir, base_model, tmp_path, monkeypatch, capsys):
    model, tokenizer = base_model
    monkeypatch.setattr(ingest, "CHUNK_BYTES", 300)  # many pieces, cut at safe points
    src = tmp_path / "doc.txt"
    src.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "tree"
    assert run("--config", write_config(tmp_path), "--input", src, "--out", out) == 0
    assert "tok/s" in capsys.readouterr().out
    want = [tokenizer.get_bos_token_id()] + tokenizer.encode(TEXT)
    identity = GistNet(GistNetConfig(n_embd=128, head="mean")).identity()
    with MegaContextTree.open(out, expect_model_name="base:d2@40", expect_gistnet=identity) as tree:
        assert tree.tokens().tolist() == want
        F = len(want) // 32
        assert tree.num_gists(1) == F and tree.pending_tokens == len(want) % 32
        with torch.no_grad():
            emb = token_embeddings(model, torch.tensor(want[:F * 32]).view(F, 32))
        np.testing.assert_allclose(tree.gists(1).astype(np.float32), emb.mean(dim=1).numpy(), atol=2e-3)

    # --append continues the same tree, pending tail included
    more = tmp_path / "more.txt"
    more.write_text("And then some more text.\n" * 5)
    assert run("--config", write_config(tmp_path), "--input", more, "--out", out, "--append", "--no-bos") == 0
    with MegaContextTree.open(out, readonly=True) as tree:
        assert tree.tokens().tolist() == want + tokenizer.encode(more.read_text())


def test_directory_input_in_order_and_a_saved_gistnet(fixture_base_dir, base_model, tmp_path):
    model, tokenizer = base_model
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("second file\n" * 40)
    (docs / "sub" / "c.txt").write_text("third file, in a subdirectory\n" * 40)
    (docs / "a.txt").write_text("first file\n" * 40)
    (docs / ".hidden.txt").write_bytes(b"\xff\xfe never read")
    (docs / "skip.md").write_text("not matched by the glob")
    gistnet = GistNet(GistNetConfig(n_embd=128, head="mean_linear")).init_weights(seed=1)
    with torch.no_grad():
        gistnet.levels[0].proj.weight.mul_(0.5)
    ckpt = tmp_path / "gistnet.pt"
    torch.save({"gistnet": {"config": asdict(gistnet.config), "state_dict": gistnet.state_dict()}}, ckpt)
    out = tmp_path / "tree"
    assert run("--config", write_config(tmp_path, gistnet=ckpt, dtype="bf16"), "--input", docs,
               "--glob", "*.txt", "--out", out) == 0
    bos = tokenizer.get_bos_token_id()
    want = []
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        want += [bos] + tokenizer.encode((docs / name).read_text())
    with MegaContextTree.open(out, expect_gistnet=gistnet.identity()) as tree:
        assert tree.dtype == "bfloat16" and tree.tokens().tolist() == want
        F = len(want) // 32
        with torch.no_grad():
            gists = gistnet(token_embeddings(model, torch.tensor(want[:F * 32]).view(F, 32)), 1)
        np.testing.assert_allclose(tree.gists(1), gists.bfloat16().float().numpy(), atol=1e-2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(list("ab 1.'\n\r\t\u00e9\u65e5") + ["  ", "\n\n", " \n", "word"]),
                    max_size=150).map("".join),
       chunk=st.integers(1, 40))
def test_pieces_never_change_the_tokenization(upstream_fixtures, tmp_path_factory, text, chunk):
    tokenizer = RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))
    path = tmp_path_factory.mktemp("p") / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = [p for p, _ in ingest.read_pieces(path, "utf-8", chunk_bytes=chunk)]
    assert "".join(pieces) == text  # nothing lost or translated (newlines stay as they are)
    assert sum((tokenizer.encode(p) for p in pieces), []) == tokenizer.encode("".join(pieces))


# -----------------------------------------------------------------------------
# bad input: one line, nothing lost


def test_bad_inputs_are_one_line_and_touch_nothing(fixture_base_dir, tmp_path, capsys):
    cfg = write_config(tmp_path)
    good = tmp_path / "good.txt"
    good.write_text("hello world\n" * 50)
    out = tmp_path / "tree"
    assert run("--config", cfg, "--input", good, "--out", out) == 0
    before = snapshot(out)
    capsys.readouterr()

    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 3)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "emptydir").mkdir()
    cases = [
        (["--input", latin, "--out", tmp_path / "t2"], "latin.txt is not valid utf-8 text (byte 0xE9 at offset 3); pass --encoding"),
        (["--input", empty, "--out", tmp_path / "t2"], "empty.txt is empty; nothing to ingest"),
        (["--input", tmp_path / "emptydir", "--out", tmp_path / "t2"], "has no files matching"),
        (["--input", tmp_path / "nope.txt", "--out", tmp_path / "t2"], "nope.txt does not exist"),
        (["--input", good, "--out", tmp_path / "t2", "--encoding", "klingon"], "unknown text encoding 'klingon'"),
        (["--input", good, "--out", out], "already holds a MegaContext tree; pass --append"),
        (["--input", good, "--out", tmp_path / "t3", "--append"], "holds no MegaContext tree to continue"),
    ]
    for argv, message in cases:
        assert run("--config", cfg, *argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (message, err)
    # the right encoding reads it
    assert run("--config", cfg, "--input", latin, "--out", tmp_path / "t4", "--encoding", "latin-1") == 0
    capsys.readouterr()

    config_cases = [
        (write_config(tmp_path, "c1", model_tag="d99"), "model_tag 'd99'"),
        (write_config(tmp_path, "c2", step=7), "model_000007.pt"),
        (write_config(tmp_path, "c3", gistnet=tmp_path / "missing.pt"), "missing.pt does not exist"),
        (write_config(tmp_path, "c4", gistnet=None), "no 'gistnet' key"),
        (write_config(tmp_path, "c5", model_name="other"), "refusing to append"),
        (write_config(tmp_path, "c6", dtype="fp8"), "dtype must be fp16 or bf16"),
    ]
    for config, message in config_cases:
        assert run("--config", config, "--input", good, "--out", out, "--append") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (message, err)
    assert snapshot(out) == before


def test_append_refuses_a_tree_of_another_gistnet(fixture_base_dir, tmp_path, capsys):
    out = tmp_path / "tree"
    MegaContextTree.create(out, "base:d2@40", 128, "some-other-gistnet").close()
    before = snapshot(out)
    src = tmp_path / "x.txt"
    src.write_text("text\n")
    assert run("--config", write_config(tmp_path), "--input", src, "--out", out, "--append") == 1
    err = capsys.readouterr().err
    assert "refusing to append" in err and "regenerate the gists with this GistNet" in err
    assert snapshot(out) == before


@pytest.mark.slow  # a fresh interpreter importing torch: 5-30 s on a busy 2-core machine
def test_cli_prints_one_line_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\x80\x81")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gistnet: mean\n")
    proc = subprocess.run([sys.executable, "-m", "megacontext.ingest", "--config", str(cfg), "--input", str(bad),
                           "--out", str(tmp_path / "t")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {bad} is not valid utf-8 text (byte 0x80 at offset 3); pass --encoding "
                                   f"(e.g. --encoding latin-1) if it is another encoding")
    assert not (tmp_path / "t").exists()
