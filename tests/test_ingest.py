"""
Specification of megacontext/ingest.py: `python -m megacontext.ingest` builds a tree from text.

End to end on the fixture checkpoint (base d2 step 40, its tokenizer) with the mean gister
and with a saved GistNet: the tree holds BOS + the file's tokens and their gists; --append
continues it; directories are read in order. Pieces cut for tokenization never change the
token ids. Every bad input is one line naming the problem, and leaves the disk as it was.
"""
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_probe import exit_before_torch
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
        (["--input", latin, "--out", out, "--encoding", "latin-1"],
         "already holds a MegaContext tree built from other input"),
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
    more = tmp_path / "more.txt"
    more.write_text("more text\n" * 20)
    for config, message in config_cases:
        assert run("--config", config, "--input", more, "--out", out, "--append") == 1
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


# -----------------------------------------------------------------------------
# resumable, idempotent ingest


class SimulatedKill(BaseException):
    """Raised inside a storage append: the process 'dies' between two commits (not caught as an error)."""


def _tree_state(out):
    with MegaContextTree.open(out, readonly=True) as tree:
        return tree.tokens().tolist(), tree.gists(1).astype(np.float32), tree.gists(2).astype(np.float32), tree.sources


def test_killed_ingests_rerun_to_exactly_the_clean_tree(fixture_base_dir, tmp_path, monkeypatch, capsys):
    import random
    from megacontext import storage
    monkeypatch.setattr(ingest, "CHUNK_BYTES", 400)  # many pieces, so kills land inside files too
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, word in enumerate(["alpha", "beta", "gamma"]):
        (docs / f"{i}.txt").write_text("".join(f"{word} line {j} with some words.\n" for j in range(60 + 30 * i)))
    cfg = write_config(tmp_path)  # batch_size 4: an append every 4 blocks
    clean, out = tmp_path / "clean", tmp_path / "tree"
    assert run("--config", cfg, "--input", docs, "--out", clean) == 0
    want_tokens, want1, want2, want_sources = _tree_state(clean)
    assert len(want_tokens) > 2000 and len(want_sources) == 3

    real_append = storage.CtxWriter.append
    calls = {"n": 0, "kill_at": None}

    def append(self, entries):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise SimulatedKill()
        return real_append(self, entries)

    monkeypatch.setattr(storage.CtxWriter, "append", append)
    rng = random.Random(1234)
    kills = 0
    for _ in range(6):
        calls.update(n=0, kill_at=rng.randint(1, 40))
        try:
            code = run("--config", cfg, "--input", docs, "--out", out)
        except SimulatedKill:
            kills += 1
            continue
        assert code == 0
    assert kills >= 4
    calls["kill_at"] = None
    capsys.readouterr()
    assert run("--config", cfg, "--input", docs, "--out", out) == 0
    tokens, g1, g2, sources = _tree_state(out)
    assert tokens == want_tokens  # token for token: no prefix ingested twice, nothing lost
    np.testing.assert_allclose(g1, want1, atol=1e-3)
    np.testing.assert_allclose(g2, want2, atol=1e-3)
    assert [(s["path"], s["start"], s["tokens"]) for s in sources] == \
        [(s["path"], s["start"], s["tokens"]) for s in want_sources]

    # the same command again: a no-op that says so, touching nothing
    before = snapshot(out)
    capsys.readouterr()
    assert run("--config", cfg, "--input", docs, "--out", out) == 0
    assert "nothing to do, all 3 source(s) are already whole" in capsys.readouterr().out
    assert snapshot(out) == before
    # --append of a new source appends it (the whole ones are not read again)
    extra = tmp_path / "extra.txt"
    extra.write_text("delta and epsilon.\n" * 30)
    assert run("--config", cfg, "--input", extra, "--out", out, "--append") == 0
    tokens2, _, _, sources2 = _tree_state(out)
    assert tokens2[:len(want_tokens)] == want_tokens and len(sources2) == 4
    assert sources2[-1]["start"] == len(want_tokens) and sources2[-1]["tokens"] == len(tokens2) - len(want_tokens)


def test_an_unfinished_source_must_be_finished_by_its_own_command(fixture_base_dir, tmp_path, monkeypatch, capsys):
    from megacontext import storage
    src, other, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "tree"
    src.write_text("first source line.\n" * 200)
    other.write_text("second source.\n" * 20)
    cfg = write_config(tmp_path)
    real_append = storage.CtxWriter.append
    seen = {"n": 0}

    def append(self, entries):
        seen["n"] += 1
        if seen["n"] == 7:
            raise SimulatedKill()
        return real_append(self, entries)

    monkeypatch.setattr(storage.CtxWriter, "append", append)
    with pytest.raises(SimulatedKill):
        run("--config", cfg, "--input", src, "--out", out)
    monkeypatch.setattr(storage.CtxWriter, "append", real_append)
    capsys.readouterr()
    assert run("--config", cfg, "--input", other, "--out", out, "--append") == 1
    err = capsys.readouterr().err
    assert "holds an unfinished ingest of" in err and "a.txt" in err and "re-run the command" in err
    src.write_text("first source line, edited.\n" * 200)  # the same path, other content
    assert run("--config", cfg, "--input", src, "--out", out) == 1
    assert "it has changed since" in capsys.readouterr().err


def test_binary_files_are_skipped_and_counted(fixture_base_dir, tmp_path, capsys):
    docs = tmp_path / "pkg"
    (docs / "__pycache__").mkdir(parents=True)
    (docs / "mod.py").write_text("def f():\n    return 1\n" * 20)
    (docs / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0" + bytes(range(256)))
    (docs / "blob.bin").write_bytes(b"abc\0def")
    out = tmp_path / "tree"
    assert run("--config", write_config(tmp_path), "--input", docs, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 binary file(s)" in printed and "--glob" in printed
    _, _, _, sources = _tree_state(out)
    assert [Path(s["path"]).name for s in sources] == ["mod.py"]
    # a binary file named on its own is an error, not a skip
    assert run("--config", write_config(tmp_path), "--input", docs / "blob.bin", "--out", tmp_path / "t2") == 1
    assert "looks binary" in capsys.readouterr().err


def test_unknown_config_keys_and_help_defaults(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gistnet: mean\nbatchsize: 3\n")
    src = tmp_path / "a.txt"
    src.write_text("x\n")
    assert run("--config", cfg, "--input", src, "--out", tmp_path / "t") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'batchsize'" in err[0] and "did you mean 'batch_size'" in err[0]
    assert not (tmp_path / "t").exists()
    assert ingest.load_config(REPO_ROOT / "configs" / "ingest_cpu.yaml")["model_tag"] == "cpu_tiny"
    help_text = ingest.build_parser().format_help()
    assert "(default: *)" in help_text and "(default: utf-8)" in help_text


def test_refusal_names_both_gistnet_ids_and_the_refresh_command(fixture_base_dir, tmp_path, capsys):
    out = tmp_path / "tree"
    src = tmp_path / "x.txt"
    src.write_text("some text to gist, long enough for a few blocks.\n" * 30)
    cfg = write_config(tmp_path)
    assert run("--config", cfg, "--input", src, "--out", out) == 0
    printed = capsys.readouterr().out
    identity = GistNet(GistNetConfig(n_embd=128, head="mean")).identity()
    from megacontext.storage import gistnet_id
    assert f"GistNet {identity} (id {gistnet_id(identity)}, 0x{gistnet_id(identity):08X})" in printed
    # a tree of another GistNet: the refusal names the command that regenerates its gists
    other = tmp_path / "other"
    MegaContextTree.create(other, "base:d2@40", 128, "some-other-gistnet").close()
    more = tmp_path / "more.txt"
    more.write_text("more\n" * 40)
    assert run("--config", cfg, "--input", more, "--out", other, "--append") == 1
    err = capsys.readouterr().err
    command = f"python -m megacontext.ingest --config {cfg} --out {other} --refresh"
    assert command in err and f"id {gistnet_id(identity)}" in err
    # and that command does it: afterwards the append goes through
    assert run(*command.split()[3:]) == 0
    assert "regenerated" in capsys.readouterr().out
    assert run("--config", cfg, "--input", more, "--out", other, "--append") == 0


@pytest.mark.slow  # several fresh interpreters importing torch, each SIGKILLed mid-ingest
def test_sigkilled_cli_ingest_reruns_to_the_clean_tree(fixture_base_dir, tmp_path):
    import os
    import random
    import signal
    import time
    src = tmp_path / "big.txt"
    src.write_text("".join(f"line {i}: the fox and the dog, {i * 7 % 13} times.\n" for i in range(12000)))
    cfg = write_config(tmp_path, batch_size=8)
    clean, out = tmp_path / "clean", tmp_path / "tree"
    assert run("--config", cfg, "--input", src, "--out", clean) == 0
    want_tokens, want1, _, _ = _tree_state(clean)
    full_bytes = len(want_tokens) // 32 * 128
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(fixture_base_dir))
    cmd = [sys.executable, "-m", "megacontext.ingest", "--config", str(cfg), "--input", str(src), "--out", str(out)]
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        threshold = 64 + rng.randint(full_bytes // 10, full_bytes * 9 // 10)
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            lod0 = out / "LOD0.ctx"
            if lod0.exists() and lod0.stat().st_size >= threshold:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert kills >= 2
    assert run("--config", cfg, "--input", src, "--out", out) == 0
    tokens, g1, _, sources = _tree_state(out)
    assert tokens == want_tokens
    np.testing.assert_allclose(g1, want1, atol=1e-3)
    assert len(sources) == 1 and sources[0]["tokens"] == len(want_tokens)


def test_a_flag_typo_is_rejected_before_torch_is_imported():
    import megacontext.ingest as ingest_module
    from megacontext.tree import META_FILENAME
    assert ingest_module.META_FILENAME == META_FILENAME
    out, err = exit_before_torch('megacontext.ingest', ['--config', 'configs/ingest_cpu.yaml', '--inptu', 'x'])
    assert out == "exit 2 False", out + err
