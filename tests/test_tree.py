"""
Specification of megacontext/tree.py: the MegaContext Tree over LOD0/LOD1/LOD2.ctx.

Ingest in arbitrary pieces gives the same tree as one call; every LOD1 gist is the gister's
output for its block and every LOD2 gist for its 32 LOD1 gists; the pending tail survives a
reopen; node arithmetic (spans, parents, children, lookups by position); crashes inside
ingest and inside refresh leave a consistent tree that the next open repairs; refresh of
everything or of a block range, with stale gists detectable; refusals of trees made for
another model or GistNet; and memory that does not grow with the document.
"""
import json
import os
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megacontext import tree as tree_module
from megacontext.storage import open_ctx
from megacontext.tree import (MegaContextTree, Node, node_children, node_index_at, node_parent, node_span,
                              span_id)

D, VOCAB = 16, 300
TABLE = torch.randn(VOCAB, D, generator=torch.Generator().manual_seed(0))


def embed(ids):
    return TABLE[ids]


def mean_gist(x, level):
    return x.float().mean(dim=1)


def max_gist(x, level):
    return x.float().amax(dim=1) * (1.0 if level == 1 else 0.5)


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def new_tree(path, gist_fn=mean_gist, name="mean", **kw):
    kw = {"durable": False, **kw}
    return MegaContextTree.create(path, "m", D, name, embed_fn=embed, gist_fn=gist_fn, **kw)


def expected_gists(ids, B=32, gist_fn=mean_gist, dtype=np.float16):
    """LOD1/LOD2 computed directly: the gist of each whole block, then of each B stored LOD1 gists."""
    F = len(ids) // B
    lod1 = gist_fn(embed(torch.as_tensor(ids[:F * B]).view(F, B)), 1).numpy().astype(dtype)
    G = F // B
    lod2 = gist_fn(torch.from_numpy(lod1[:G * B].astype(np.float32)).view(G, B, D), 2).numpy().astype(dtype)
    return lod1, lod2


def assert_tree_matches(tree, ids, gist_fn=mean_gist):
    B = tree.block_size
    assert tree.num_tokens == len(ids) and tree.num_blocks == len(ids) // B
    assert tree.pending_tokens == len(ids) % B
    assert np.array_equal(tree.tokens(), ids)
    lod1, lod2 = expected_gists(ids, B, gist_fn)
    np.testing.assert_allclose(tree.gists(1).astype(np.float32), lod1.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(tree.gists(2).astype(np.float32), lod2.astype(np.float32), atol=2e-3)


# -----------------------------------------------------------------------------
# nodes


def test_node_arithmetic():
    assert node_span(0, 3) == (96, 128) and node_span(1, 3) == (96, 128) and node_span(2, 3) == (3072, 4096)
    assert node_index_at(0, 95) == 2 and node_index_at(1, 96) == 3 and node_index_at(2, 1023) == 0
    assert node_parent(0, 70) == (1, 70) and node_parent(1, 70) == (2, 2) and node_parent(2, 0) is None
    assert node_children(2, 1) == [(1, k) for k in range(32, 64)]
    assert node_children(1, 7) == [(0, 7)] and node_children(0, 7) == []
    for level in range(3):  # every child's parent is its parent
        for child in node_children(level, 5):
            assert node_parent(*child) == (level, 5)
    ids = {span_id(level, i) for level in range(3) for i in range(1000)}
    assert len(ids) == 3000
    with pytest.raises(IndexError):
        node_index_at(0, -1)


def test_tree_lookups(tmp_path):
    ids = stream(3 * 1024 + 40)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids)
        assert tree.node_at(0, 3100) == Node(0, 96, 3072, 3104)
        assert tree.node_at(0, 3110) == Node(0, 97, 3104, 3112)  # the partial block, clipped
        assert tree.node_at(1, 3100) == Node(1, 96, 3072, 3104)
        assert tree.node_at(2, 3000).span_id == span_id(2, 2)
        assert tree.node(2, 1).children == [(1, k) for k in range(32, 64)]
        with pytest.raises(IndexError, match="does not exist"):
            tree.node_at(1, 3110)  # no gist for the partial block yet
        with pytest.raises(IndexError, match="does not exist"):
            tree.node(2, 3)
        with pytest.raises(IndexError, match="outside"):
            tree.tokens(10, 4000)
        assert tree.num_nodes(0) == 98 and tree.num_nodes(1) == 97 and tree.num_nodes(2) == 3
        assert np.array_equal(tree.tokens(3090, 3112), ids[3090:3112])  # across blocks and into the tail
        assert tree.gists(1, 5, 9).shape == (4, D)


# -----------------------------------------------------------------------------
# ingest


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.integers(0, 300), min_size=1, max_size=6), reopen=st.booleans(),
       dtype=st.sampled_from(["fp16", "bf16"]), batch_blocks=st.sampled_from([3, 10, 256]))
def test_ingest_in_pieces_equals_the_direct_computation(tmp_path_factory, pieces, reopen, dtype, batch_blocks):
    path = tmp_path_factory.mktemp("t") / "tree"
    B = 4  # small blocks reach LOD2 after 16 tokens
    ids = stream(sum(pieces), seed=len(pieces))
    tree = new_tree(path, block_size=B, dtype=dtype, batch_blocks=batch_blocks)
    pos = 0
    for n in pieces:
        assert tree.ingest(ids[pos:pos + n]) == pos + n
        pos += n
        if reopen:
            tree.close()
            tree = MegaContextTree.open(path, expect_gistnet="mean", embed_fn=embed, gist_fn=mean_gist,
                                        batch_blocks=batch_blocks)
    assert tree.dtype == ("float16" if dtype == "fp16" else "bfloat16")
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    lod1, lod2 = expected_gists(ids, B, dtype=np_dtype)
    assert np.array_equal(tree.tokens(), ids) and tree.pending_tokens == len(ids) % B
    tol = 2e-3 if dtype == "fp16" else 2e-2
    np.testing.assert_allclose(tree.gists(1).astype(np.float32), lod1.astype(np.float32), atol=tol)
    np.testing.assert_allclose(tree.gists(2).astype(np.float32), lod2.astype(np.float32), atol=tol)
    tree.close()


def test_ingest_full_size_blocks_and_inputs(tmp_path):
    ids = stream(2 * 1024 + 77)
    with new_tree(tmp_path / "t", batch_blocks=5) as tree:
        tree.ingest(torch.as_tensor(ids[:1000]))  # tensors, lists and arrays are all fine
        tree.ingest(ids[1000:1500].tolist())
        tree.ingest(ids[1500:].astype(np.uint32))
        tree.ingest([])
        assert_tree_matches(tree, ids)
        assert tree.missing_gists == (0, 0)


def test_pending_tail_survives_reopen(tmp_path):
    ids = stream(1000)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids[:37])
    meta = json.loads((tmp_path / "t" / "tree.json").read_text())
    assert meta["tail"] == ids[32:37].tolist() and meta["lod0_blocks"] == 1
    with MegaContextTree.open(tmp_path / "t", readonly=True) as ro:
        assert ro.num_tokens == 37 and np.array_equal(ro.tokens(), ids[:37])
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="mean", embed_fn=embed, gist_fn=mean_gist) as tree:
        assert tree.pending_tokens == 5
        tree.ingest(ids[37:])
        assert_tree_matches(tree, ids)


def test_bad_tokens_and_bad_gister_output_are_refused(tmp_path):
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(stream(40))
        for bad, match in [([1.5, 2.0], "integers"), ([-1], "0..2\\*\\*32-1"), (np.zeros((2, 32), dtype=int), "1-D")]:
            with pytest.raises(ValueError, match=match):
                tree.ingest(bad)
        assert tree.num_tokens == 40
    wrong = lambda x, level: x.float().mean(dim=1)[:, :3]
    with MegaContextTree.create(tmp_path / "w", "m", D, "w", embed_fn=embed, gist_fn=wrong, durable=False) as tree:
        with pytest.raises(ValueError, match=r"gist_fn returned shape \(1, 3\) for 1 LOD1 inputs; expected \(1, 16\)"):
            tree.ingest(stream(40))
        assert tree.num_blocks == 1 and tree.num_gists(1) == 0  # the block stays; its gist is redone later


def test_read_only_tree_follows_a_writer(tmp_path):
    ids = stream(5000)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids[:100])
        ro = MegaContextTree.open(tmp_path / "t", readonly=True)
        assert ro.num_tokens == 100
        tree.ingest(ids[100:])
        assert ro.reload() == 5000
        assert_tree_matches(ro, ids)
        with pytest.raises(RuntimeError, match="read-only"):
            ro.ingest(ids[:5])
        ro.close()


def test_a_follower_reopens_the_files_a_whole_refresh_swapped_in(tmp_path):
    ids = stream(3 * 1024 + 50)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids)
        ro = MegaContextTree.open(tmp_path / "t", readonly=True)
        old1 = ro.gists(1)
        tree.refresh(max_gist, "max")
        assert np.array_equal(ro.gists(1), old1)  # until reload: the snapshot it opened
        gen = ro.generation
        assert ro.reload() == len(ids)
        assert ro.generation == gen + 1 and ro.gistnet_name == "max" and not ro.is_stale("max")
        assert_tree_matches(ro, ids, max_gist)
        tree.ingest(ids[:100])  # and it keeps following the new files
        assert ro.reload() == len(ids) + 100 and ro.generation == gen + 1
        assert_tree_matches(ro, np.concatenate([ids, ids[:100]]), max_gist)
        ro.close()


def test_a_follower_refuses_what_its_open_would_refuse_and_closes(tmp_path):
    ids = stream(2 * 1024)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids)
        ro = MegaContextTree.open(tmp_path / "t", readonly=True, expect_gistnet="mean")
        tree.refresh(max_gist, "max")
        with pytest.raises(ValueError, match="writer swapped in refreshed gists.*not by GistNet 'mean'"):
            ro.reload()
        with pytest.raises(ValueError, match="closed"):  # never the old gists again
            ro.gists(1, 0, 1)
        ro = MegaContextTree.open(tmp_path / "t", readonly=True, expect_gistnet="max")
        tree.refresh(mean_gist, "max", 0, 10)  # the GistNet it names, no stale blocks: followed
        assert ro.reload() == len(ids) and ro.generation == 1
        tree.refresh(mean_gist, "mean2", 0, 10)  # a range refresh by another GistNet: refused on its id
        with pytest.raises(ValueError, match="not by GistNet 'max'"):
            ro.reload()


def test_a_follower_refuses_a_refresh_in_progress_and_a_replaced_tree(tmp_path):
    ids = stream(2 * 1024)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids)
    ro = MegaContextTree.open(tmp_path / "t", readonly=True)
    (tmp_path / "t" / "refresh.json").write_text("{}")  # a writer between its journal and the swap
    with pytest.raises(RuntimeError, match="unfinished gist refresh.*keeps its last snapshot"):
        ro.reload()
    assert np.array_equal(ro.tokens(), ids)  # nothing was swapped in: it still reads its snapshot
    (tmp_path / "t" / "refresh.json").unlink()
    assert ro.reload() == len(ids)
    with new_tree(tmp_path / "other") as other:
        other.ingest(ids[:100])
    os.replace(tmp_path / "other" / "LOD0.ctx", tmp_path / "t" / "LOD0.ctx")
    with pytest.raises(RuntimeError, match="LOD0.ctx is another file than the one this tree opened"):
        ro.reload()


def test_ingest_without_a_gister_says_how_to_open(tmp_path):
    new_tree(tmp_path / "t").close()
    with MegaContextTree.open(tmp_path / "t") as tree:
        with pytest.raises(RuntimeError, match="opened without a gister"):
            tree.ingest([1, 2, 3])
    with pytest.raises(ValueError, match="expect_gistnet"):
        MegaContextTree.open(tmp_path / "t", embed_fn=embed, gist_fn=mean_gist)


# -----------------------------------------------------------------------------
# identity and refusals


def test_other_model_or_gistnet_is_refused_and_nothing_is_touched(tmp_path):
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(stream(2000))
    before = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}
    with pytest.raises(ValueError, match="base model 'm', not 'other'"):
        MegaContextTree.open(tmp_path / "t", expect_model_name="other")
    with pytest.raises(ValueError, match="not by GistNet 'gistnet-x'"):
        MegaContextTree.open(tmp_path / "t", expect_gistnet="gistnet-x", embed_fn=embed, gist_fn=mean_gist)
    with pytest.raises(FileExistsError, match="already holds a MegaContext tree"):
        new_tree(tmp_path / "t")
    after = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}
    assert before == after
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MegaContextTree.open(tmp_path / "nope")


def test_bad_create_arguments_leave_no_files(tmp_path):
    for kw, match in [(dict(embedding_dim=0), "embedding_dim"), (dict(dtype="fp8"), "gist dtype"),
                      (dict(batch_blocks=0), "batch_blocks"), (dict(gist_fn=mean_gist, embed_fn=None), "embed_fn")]:
        args = {"embedding_dim": D, "embed_fn": embed, "gist_fn": mean_gist, **kw}
        with pytest.raises(ValueError, match=match):
            MegaContextTree.create(tmp_path / "t", "m", gistnet_name="mean", **args)
        assert not (tmp_path / "t").exists() or not list((tmp_path / "t").iterdir())


# -----------------------------------------------------------------------------
# crashes


class Boom(Exception):
    pass


def failing_after(n_calls, gist_fn=mean_gist):
    calls = {"n": 0}

    def fn(x, level):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise Boom()
        return gist_fn(x, level)
    return fn


@pytest.mark.parametrize("n_ok", [0, 2, 5])
def test_crash_inside_ingest_keeps_a_prefix_and_reopen_repairs_it(tmp_path, n_ok):
    ids = stream(3000)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids[:50])  # 1 block + 18 pending tokens
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="mean", embed_fn=embed,
                              gist_fn=failing_after(n_ok), batch_blocks=8) as tree:
        with pytest.raises(Boom):
            tree.ingest(ids[50:])
    # reopened as if the process had died: the pending tail of before went into LOD0 blocks,
    # tree.json is stale, so the tree is exactly its committed whole blocks
    with MegaContextTree.open(tmp_path / "t", readonly=True) as ro:
        assert ro.missing_gists[0] > 0 or n_ok > 0
        n = ro.num_tokens
        assert n % 32 == 0 and 64 <= n < 3000 and ro.pending_tokens == 0
        assert np.array_equal(ro.tokens(), ids[:n])
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="mean", embed_fn=embed, gist_fn=mean_gist) as tree:
        assert tree.missing_gists == (0, 0)  # regenerated on open
        tree.ingest(ids[n:])  # the caller feeds the rest again from num_tokens
        assert_tree_matches(tree, ids)


# -----------------------------------------------------------------------------
# refresh and staleness


def test_full_refresh(tmp_path):
    ids = stream(3 * 1024 + 50)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids)
        assert not tree.is_stale("mean") and tree.is_stale("max")
        gen = tree.generation
        tree.refresh(max_gist, "max")
        assert tree.generation == gen + 1 and not tree.is_stale("max") and tree.is_stale("mean")
        assert_tree_matches(tree, ids, max_gist)
        tree.ingest(ids[:100])  # new blocks are gisted by the new GistNet
        assert_tree_matches(tree, np.concatenate([ids, ids[:100]]), max_gist)
    assert not list((tmp_path / "t").glob(".*"))  # no temporary files left
    with pytest.raises(ValueError, match="not by GistNet 'mean'"):
        MegaContextTree.open(tmp_path / "t", expect_gistnet="mean")
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="max") as tree:
        assert tree.gistnet_name == "max"


def test_range_refresh_marks_the_rest_stale(tmp_path):
    ids = stream(4 * 1024)  # 128 blocks, 4 LOD2 groups
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids)
        old1, old2 = tree.gists(1), tree.gists(2)
        tree.refresh(max_gist, "max", 40, 70)
        new1, new2 = tree.gists(1), tree.gists(2)
        want1, _ = expected_gists(ids, gist_fn=max_gist)
        assert np.array_equal(new1[:40], old1[:40]) and np.array_equal(new1[70:], old1[70:])
        np.testing.assert_allclose(new1[40:70].astype(np.float32), want1[40:70].astype(np.float32), atol=2e-3)
        # LOD2 groups 1 and 2 cover blocks 32..95 and are redone from the new LOD1; 0 and 3 are kept
        assert np.array_equal(new2[[0, 3]], old2[[0, 3]])
        redo = max_gist(torch.from_numpy(new1[32:96].astype(np.float32)).view(2, 32, D), 2).numpy()
        np.testing.assert_allclose(new2[1:3].astype(np.float32), redo, atol=2e-3)
        assert tree.stale_blocks() == [[0, 40], [70, 128]]
        assert tree.is_stale("max")
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="max", embed_fn=embed, gist_fn=max_gist) as tree:
        assert tree.stale_blocks() == [[0, 40], [70, 128]]  # kept in tree.json
        tree.refresh(max_gist, "max", 0, 40)
        assert tree.stale_blocks() == [[70, 128]]
        tree.refresh(max_gist, "max", 60, 128)
        assert tree.stale_blocks() == [] and not tree.is_stale("max")
        assert_tree_matches(tree, ids, max_gist)


def range_refreshed_tree(path):
    """A tree of 128 blocks gisted by "mean", then blocks [40, 70) registed by "max"; returns the
    tree.json from before the refresh."""
    with new_tree(path) as tree:
        tree.ingest(stream(4 * 1024))
        before = (path / "tree.json").read_text()
        tree.refresh(max_gist, "max", 40, 70)
    return before


def test_range_refresh_flags_the_gist_files(tmp_path):
    range_refreshed_tree(tmp_path / "t")
    for name in ("LOD1.ctx", "LOD2.ctx"):
        assert open_ctx(tmp_path / "t" / name, expect_gistnet="max").holds_stale_gists
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="max", embed_fn=embed, gist_fn=max_gist) as tree:
        tree.refresh(max_gist, "max", 0, 40)  # still stale blocks: still flagged
        assert open_ctx(tmp_path / "t" / "LOD1.ctx").holds_stale_gists
        tree.refresh(max_gist, "max", 70, 128)  # none left: a plain file again
        assert tree.stale_blocks() == [] and not open_ctx(tmp_path / "t" / "LOD1.ctx").holds_stale_gists
    with MegaContextTree.open(tmp_path / "t", readonly=True, expect_gistnet="max") as ro:
        assert not ro.is_stale("max")


@pytest.mark.parametrize("loss", ["deleted", "older copy", "stale list emptied"])
def test_a_lost_stale_record_cannot_make_a_mixed_tree_pass_as_one_gistnets(tmp_path, loss):
    before = range_refreshed_tree(tmp_path / "t")
    meta_path = tmp_path / "t" / "tree.json"
    if loss == "deleted":
        meta_path.unlink()
    elif loss == "older copy":  # names "mean", but the files are "max"'s now: the record is void
        meta_path.write_text(before)
    else:
        meta_path.write_text(json.dumps(dict(json.loads(meta_path.read_text()), stale_lod1_blocks=[])))
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="max", embed_fn=embed, gist_fn=max_gist) as tree:
        # which blocks are stale is unknown now: every gist the tree held counts as stale
        assert tree.is_stale("max") and tree.stale_blocks() == [[0, 128]]
        tree.ingest(stream(40))  # tree.json is written again, with the conservative record
    assert json.loads(meta_path.read_text())["stale_lod1_blocks"] == [[0, 128]]
    with pytest.raises(ValueError, match=r"still holds gists of an earlier GistNet in LOD1 blocks \[\[0, 128\]\].*"
                                         r"not all of them were made by GistNet 'max'"):
        MegaContextTree.open(tmp_path / "t", readonly=True, expect_gistnet="max")
    with MegaContextTree.open(tmp_path / "t", readonly=True) as ro:  # without a GistNet to insist on
        assert ro.is_stale("max")
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="max", embed_fn=embed, gist_fn=max_gist) as tree:
        tree.refresh(max_gist, "max")  # the whole tree: the only way out, and a sure one
        assert not tree.is_stale("max")
    with MegaContextTree.open(tmp_path / "t", readonly=True, expect_gistnet="max") as ro:
        assert not ro.is_stale("max") and ro.gistnet_name == "max"


def test_a_reader_naming_a_gistnet_refuses_stale_blocks(tmp_path):
    range_refreshed_tree(tmp_path / "t")  # tree.json intact: the record says [[0, 40], [70, 128]]
    with pytest.raises(ValueError, match=r"LOD1 blocks \[\[0, 40\], \[70, 128\]\]"):
        MegaContextTree.open(tmp_path / "t", readonly=True, expect_gistnet="max")
    with pytest.raises(ValueError, match="not by GistNet 'mean'"):
        MegaContextTree.open(tmp_path / "t", readonly=True, expect_gistnet="mean")


def test_crash_before_the_journal_leaves_the_old_tree(tmp_path):
    ids = stream(2 * 1024 + 10)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids)
        before = {n: (tmp_path / "t" / n).read_bytes() for n in ("LOD1.ctx", "LOD2.ctx")}
        with pytest.raises(Boom):
            tree.refresh(failing_after(1, max_gist), "max")  # LOD1 done, dies on LOD2
        assert not tree.is_stale("mean")
        tree.ingest(ids[:40])  # still usable with its old gister
    assert not list((tmp_path / "t").glob(".*.refresh"))
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="mean") as tree:
        assert tree.gists(1, 0, 64).tobytes() == before["LOD1.ctx"][64:64 + 64 * 2 * D]
        assert tree.num_gists(2) == 2


def test_crash_after_the_journal_is_rolled_forward(tmp_path, monkeypatch):
    ids = stream(2 * 1024 + 10)
    with new_tree(tmp_path / "t") as tree:
        tree.ingest(ids)
    tree = MegaContextTree.open(tmp_path / "t", expect_gistnet="mean", embed_fn=embed, gist_fn=mean_gist)
    real_replace, calls = os.replace, []

    def die_on_second_rename(src, dst):
        calls.append(dst)
        if str(dst).endswith("LOD2.ctx"):
            raise Boom()  # the process dies between the two renames
        real_replace(src, dst)
    monkeypatch.setattr(tree_module.os, "replace", die_on_second_rename)
    with pytest.raises(Boom):
        tree.refresh(max_gist, "max")
    monkeypatch.setattr(tree_module.os, "replace", real_replace)
    tree.close()
    assert (tmp_path / "t" / "refresh.json").exists()
    # LOD1 is new and LOD2 old: a reader refuses the half-swapped tree, a writable open finishes it
    with pytest.raises(RuntimeError, match="unfinished gist refresh"):
        MegaContextTree.open(tmp_path / "t", readonly=True)
    with MegaContextTree.open(tmp_path / "t", expect_gistnet="max", embed_fn=embed, gist_fn=max_gist) as tree:
        assert not (tmp_path / "t" / "refresh.json").exists()
        assert_tree_matches(tree, ids, max_gist)
    assert open_ctx(tmp_path / "t" / "LOD2.ctx", expect_gistnet="max")


# -----------------------------------------------------------------------------
# memory


def ingest_peak(path, n_tokens, ids):
    tree = new_tree(path, batch_blocks=256)
    tracemalloc.start()
    tracemalloc.reset_peak()
    tree.ingest(ids[:n_tokens])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert tree.num_tokens == n_tokens and tree.num_gists(2) == n_tokens // 1024
    tree.close()
    return peak


def test_ingest_of_a_million_tokens_keeps_memory_flat(tmp_path):
    n = 1 << 20
    ids = stream(n)  # the caller's array (8 MiB); the tree must not copy it whole
    small = ingest_peak(tmp_path / "small", n // 4, ids)
    big = ingest_peak(tmp_path / "big", n, ids)
    # one batch of 256 blocks is 64 KiB of int64 ids: the peak is a few batches, not the document
    assert big < 1 << 20, big
    assert big < 1.25 * small + 64 * 1024, (small, big)
