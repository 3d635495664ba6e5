"""
Specification of `python -m megacontext.ctxinspect DIR`: it prints each level's header,
committed counts, stored and recomputed checksums and model identity, flags damage with
a non-zero exit status, and never changes the files it looks at. The GistNet appears as its
identity string (from tree.json) and its stored id. No module of our packages shadows a
standard-library module (megacontext.inspect did).
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megacontext.ctxinspect import main
from megacontext.storage import HEADER_SIZE, MAGIC, create_tree_dir, gistnet_id, open_ctx

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(0)
    writers = create_tree_dir(tmp_path / "tree", embedding_dim=16, dtype="bf16", model_name="d20",
                              gistnet="gistnet-a")
    writers[0].append(rng.integers(0, 65536, size=(70, 32)))
    writers[1].append(rng.standard_normal((70, 16)))
    writers[2].append(rng.standard_normal((2, 16)))
    for w in writers:
        w.close()
    return tmp_path / "tree"


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def run_main(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_prints_header_counts_checksums_and_identity(tree, capsys):
    before = snapshot(tree)
    rc, out, _ = run_main(capsys, tree)
    assert rc == 0
    for name in ("LOD0.ctx", "LOD1.ctx", "LOD2.ctx"):
        assert f"\n{name}\n" in out
    assert f"magic=0x{MAGIC:08X} version=1 level=1 block_size=32 embedding_dim=16 dtype_code=2 (bfloat16)" in out
    assert "level=0 block_size=32 embedding_dim=16 dtype_code=0 (uint32)" in out
    assert "70 committed x 128 bytes, covering 2240 tokens" in out   # LOD0
    assert "70 committed x 32 bytes, covering 2240 tokens" in out    # LOD1
    assert "2 committed x 32 bytes, covering 2048 tokens" in out     # LOD2
    assert out.count("'d20'") == 3
    # storage alone writes no tree.json: the id is shown, the identity string is unknown
    assert out.count(f"gistnet   id 0x{gistnet_id('gistnet-a'):08X} (identity string unknown") == 2
    assert "gistnet   none (token ids)" in out
    crc = open_ctx(tree / "LOD1.ctx").commit_info["payload_crc32"]
    assert f"crc32 stored 0x{crc:08X} computed 0x{crc:08X}: OK" in out
    assert "tree: consistent" in out
    assert snapshot(tree) == before  # inspecting never writes


def test_json_output_carries_the_same_facts(tree, capsys):
    rc, out, _ = run_main(capsys, tree, "--json")
    assert rc == 0
    report = json.loads(out)
    lod1 = report["files"][1]
    assert lod1["header"] == {"magic": MAGIC, "version": 1, "level": 1, "block_size": 32, "embedding_dim": 16,
                              "dtype_code": 2, "model_name": "d20"}
    assert lod1["entries"] == 70 and lod1["checksum"] == "OK"
    assert lod1["payload_crc32_stored"] == lod1["payload_crc32_computed"]
    assert lod1["gistnet_id"] == f"0x{gistnet_id('gistnet-a'):08X}"
    assert report["files"][0]["gistnet_id"] is None
    assert report["tree"] == "consistent"


def test_corruption_and_torn_tails_are_reported(tree, capsys):
    path = tree / "LOD1.ctx"
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 5)
        byte = f.read(1)
        f.seek(HEADER_SIZE + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(tree / "LOD2.ctx", "ab") as f:
        f.write(b"\x00" * 10)
    rc, out, _ = run_main(capsys, tree)
    assert rc == 1
    assert "MISMATCH (payload corrupted)" in out
    assert "10 bytes of an interrupted append" in out
    assert "tree: " not in out  # no cross-level verdict over a damaged level


def test_unreadable_header_is_an_error_line(tree, capsys):
    raw = bytearray((tree / "LOD0.ctx").read_bytes())
    struct.pack_into("<H", raw, 4, 7)
    (tree / "LOD0.ctx").write_bytes(bytes(raw))
    rc, out, _ = run_main(capsys, tree)
    assert rc == 1
    assert "ERROR     " in out and "format version 7" in out


def test_seed_spec_file_and_single_file_target(tmp_path, capsys):
    header = struct.pack("<IHHHHH32s", MAGIC, 1, 0, 32, 0, 0, b"seed") + bytes(18)
    path = tmp_path / "LOD0.ctx"
    path.write_bytes(header + np.arange(64, dtype="<u4").tobytes())
    rc, out, _ = run_main(capsys, path)
    assert rc == 0
    assert "2 committed x 128 bytes" in out
    assert "seed spec (reserved bytes zero" in out
    assert "none (seed-spec file)" in out


def test_inconsistent_levels_fail(tree, tmp_path, capsys):
    other = create_tree_dir(tmp_path / "other", embedding_dim=16, dtype="bf16", model_name="d32", gistnet="gistnet-a")
    for w in other:
        w.close()
    os.replace(tmp_path / "other" / "LOD2.ctx", tree / "LOD2.ctx")
    rc, out, _ = run_main(capsys, tree)
    assert rc == 1
    assert "tree: INCONSISTENT" in out and "'d32'" in out


def test_missing_or_empty_directory(tmp_path, capsys):
    rc, _, err = run_main(capsys, tmp_path / "nope")
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_main(capsys, tmp_path)
    assert rc == 2 and "holds no .ctx files" in err


def test_runs_as_a_module(tree):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "megacontext.ctxinspect", str(tree)], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOD2.ctx" in proc.stdout and "tree: consistent" in proc.stdout


def test_a_tree_shows_the_gistnet_identity_string_and_id(tmp_path, capsys):
    """A tree made by megacontext.tree (as ingest makes it) names its GistNet in tree.json:
    inspect prints that identity string beside the id the gist files store."""
    from megacontext.tree import MegaContextTree
    name = "gistnet:attn:d16:abc123"
    with MegaContextTree.create(tmp_path / "t", "d20", 16, name, durable=False):
        pass
    rc, out, _ = run_main(capsys, tmp_path / "t")
    assert rc == 0
    assert out.count(f"gistnet   {name!r} (id 0x{gistnet_id(name):08X})") == 2
    report = json.loads((run_main(capsys, tmp_path / "t", "--json"))[1])
    assert [f["gistnet_name"] for f in report["files"]] == [None, name, name]
    assert report["files"][1]["gistnet_name_matches"] is True
    # a tree.json that names another GistNet than the files' id is pointed out
    meta = json.loads((tmp_path / "t" / "tree.json").read_text())
    (tmp_path / "t" / "tree.json").write_text(json.dumps(dict(meta, gistnet_name="someone-else")))
    rc, out, _ = run_main(capsys, tmp_path / "t")
    assert "'someone-else' (id 0x" in out and "names another GistNet" in out


def test_no_module_shadows_the_standard_library():
    shadows = [f"{pkg}/{p.name}" for pkg in ("megacontext", "nanochat", "scripts", "tasks")
               for p in (REPO_ROOT / pkg).glob("*.py") if p.stem in sys.stdlib_module_names]
    assert shadows == []
