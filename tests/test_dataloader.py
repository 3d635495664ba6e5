"""Specification of nanochat/dataloader.py: the BOS-aligned best-fit packing loader.

The recorded upstream batches (expected/dataloader.pt) are replayed call for call and
must match exactly; on top of that we check the packing invariants, DDP sharding,
resume semantics and the errors a user with missing data gets."""
import inspect

import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataloader as dl
from nanochat.tokenizer import RustBPETokenizer

loader_with_state = dl.tokenizing_distributed_data_loader_with_state_bos_bestfit
loader = dl.tokenizing_distributed_data_loader_bos_bestfit


@pytest.fixture(scope="module")
def expected(upstream_fixtures):
    return torch.load(upstream_fixtures / "expected" / "dataloader.pt", weights_only=False)


@pytest.fixture
def tok(fixture_base_dir):
    return RustBPETokenizer.from_directory(str(fixture_base_dir / "tokenizer"))


def small(expected):
    """The keyword arguments of the recorded 'small' calls."""
    cfg = expected["config"]
    return dict(tokenizer_batch_size=cfg["tokenizer_batch_size"], buffer_size=cfg["buffer_size"], device="cpu")


def assert_batches_equal(it, recorded, with_state=True):
    for i, rec in enumerate(recorded):
        got = next(it)
        assert torch.equal(got[0], rec["inputs"]), f"inputs of batch {i} differ"
        assert torch.equal(got[1], rec["targets"]), f"targets of batch {i} differ"
        if with_state:
            assert got[2] == rec["state"], f"state of batch {i} differs"


def single_rank(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def as_rank(monkeypatch, rank, world_size):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))

# -----------------------------------------------------------------------------
# Replaying the recorded upstream calls


def test_train_batches_match_upstream(tok, expected, monkeypatch):
    single_rank(monkeypatch)
    cfg = expected["config"]
    assert len(expected["train"]) == cfg["n_train"]
    it = loader_with_state(tok, cfg["B"], cfg["T"], "train", **small(expected))
    assert_batches_equal(it, expected["train"])


def test_resume_matches_upstream(tok, expected, monkeypatch):
    single_rank(monkeypatch)
    cfg = expected["config"]
    resume = expected["resume_state"]
    assert resume == expected["train"][cfg["resume_after"]]["state"]
    it = loader_with_state(tok, cfg["B"], cfg["T"], "train", resume_state_dict=resume, **small(expected))
    assert_batches_equal(it, expected["resumed"])
    # resuming skips the rest of the saved row group: different data from the uninterrupted run
    assert not torch.equal(expected["resumed"][0]["inputs"], expected["train"][cfg["resume_after"] + 1]["inputs"])


def test_val_split_matches_upstream(tok, expected, monkeypatch):
    single_rank(monkeypatch)
    cfg = expected["config"]
    it = loader(tok, cfg["B"], cfg["T"], "val", **small(expected))
    assert_batches_equal(it, expected["val"], with_state=False)
    got = next(it)
    assert len(got) == 2  # the stateless variant yields (inputs, targets) only


class RecordingTokenizer:
    """Wraps a tokenizer and remembers how the loader called encode()."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def get_bos_token_id(self):
        return self.inner.get_bos_token_id()

    def encode(self, texts, prepend=None, num_threads=None):
        self.calls.append((len(texts), prepend, num_threads))
        return self.inner.encode(texts, prepend=prepend, num_threads=num_threads)


def test_default_arguments_match_upstream(tok, expected, monkeypatch):
    single_rank(monkeypatch)
    params = inspect.signature(loader_with_state).parameters
    # upstream's parameters in upstream's order, then our one addition (off by default)
    assert list(params) == ["tokenizer", "B", "T", "split", "tokenizer_threads", "tokenizer_batch_size",
                            "device", "resume_state_dict", "buffer_size", "exact_resume"]
    assert {k: p.default for k, p in params.items() if p.default is not p.empty} == dict(
        tokenizer_threads=4, tokenizer_batch_size=128, device="cuda", resume_state_dict=None, buffer_size=1000,
        exact_resume=False)
    cfg = expected["config"]
    rec = RecordingTokenizer(tok)
    it = loader_with_state(rec, cfg["B"], cfg["T"], "train", device="cpu")
    assert_batches_equal(it, expected["default_args"])
    # row groups hold 30 docs (< 128): one encode call per row group, BOS prepended, 4 threads;
    # filling a 1000-doc buffer from 120 train docs takes 9 passes (hence epoch 9)
    assert set(rec.calls) == {(30, tok.get_bos_token_id(), 4)}
    assert len(rec.calls) == 34  # 34 * 30 = 1020 >= 1000 (+ refills as docs are used)

# -----------------------------------------------------------------------------
# Packing invariants


def test_rows_are_bos_aligned_whole_documents_then_one_crop(tok, fixture_base_dir, monkeypatch):
    single_rank(monkeypatch)
    bos = tok.get_bos_token_id()
    texts = pq.ParquetFile(fixture_base_dir / "base_data_climbmix" / "shard_00000.parquet").read().column("text").to_pylist()
    docs = {tuple(ids) for ids in tok.encode(texts, prepend=bos, num_threads=1)}
    B, T = 3, 48
    it = loader_with_state(tok, B, T, "train", tokenizer_batch_size=8, buffer_size=16, device="cpu")
    for _ in range(12):
        x, y, state = next(it)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long and x.device.type == "cpu"
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert set(state) == {"pq_idx", "rg_idx", "epoch"}
        for r in range(B):
            row = x[r].tolist() + [y[r, -1].item()]
            assert row[0] == bos
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
            # every document but the last is placed whole; the last may be cropped
            assert all(p in docs for p in pieces[:-1])
            assert any(d[:len(pieces[-1])] == pieces[-1] for d in docs)


class ShortDocTokenizer:
    """A stand-in tokenizer that turns each text into 1..23 tokens (BOS = 256, then
    bytes), so that lengths tie often and some documents are longer than a row."""

    def get_bos_token_id(self):
        return 256

    def encode(self, texts, prepend=None, num_threads=None):
        return [[prepend] + list(t.encode()[:len(t) % 23]) for t in texts]


def reference_pack(doc_stream, B, T, buffer_size):
    """Best-fit packing written out the slow, obvious way: linear scans over a list."""
    buffer = []
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(next(doc_stream))
                room = T + 1 - len(row)
                fits = [i for i, d in enumerate(buffer) if len(d) <= room]
                if fits:
                    i = max(fits, key=lambda i: (len(buffer[i]), -i))  # longest, earliest on ties
                    row += buffer.pop(i)
                else:
                    i = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))  # shortest, earliest
                    row += buffer.pop(i)[:room]
            rows.append(row)
        yield torch.tensor(rows)


def test_packing_matches_slow_reference(fixture_base_dir, monkeypatch):
    single_rank(monkeypatch)
    tok = ShortDocTokenizer()
    pf = pq.ParquetFile(fixture_base_dir / "base_data_climbmix" / "shard_00000.parquet")
    row_groups = [pf.read_row_group(i).column("text").to_pylist() for i in range(pf.num_row_groups)]

    def doc_stream(batch_size):
        while True:  # epoch after epoch over the train shard
            for rg in row_groups:
                for i in range(0, len(rg), batch_size):
                    yield tok.encode(rg[i:i + batch_size], prepend=256)

    for B, T, batch_size, buffer_size in [(2, 16, 8, 5), (3, 9, 4, 1), (1, 50, 7, 12), (4, 31, 30, 64)]:
        ref = reference_pack(doc_stream(batch_size), B, T, buffer_size)
        it = loader(tok, B, T, "train", tokenizer_batch_size=batch_size, buffer_size=buffer_size, device="cpu")
        for step in range(40):  # several epochs of this tiny shard
            rows = next(ref)
            x, y = next(it)
            assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:]), (B, T, buffer_size, step)

# -----------------------------------------------------------------------------
# DDP sharding and resuming


def one_pass(split, tokenizer_batch_size=8, resume=None):
    """The (texts, (pq_idx, rg_idx, epoch)) batches of the first epoch."""
    out = []
    for texts, where, _ in dl._document_batches(split, resume, tokenizer_batch_size):
        if where[2] > 1:
            return out
        out.append((texts, where))


def test_two_ranks_read_disjoint_row_groups(fixture_base_dir, tok, monkeypatch):
    pf = pq.ParquetFile(fixture_base_dir / "base_data_climbmix" / "shard_00000.parquet")
    row_groups = [pf.read_row_group(i).column("text").to_pylist() for i in range(pf.num_row_groups)]
    assert len(row_groups) == 4
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        batches = one_pass("train")
        # rank r reads exactly row groups r and r+2, in order, in batches of 8 documents
        assert sorted({rg for _, (_, rg, _) in batches}) == [rank, rank + 2]
        assert [t for texts, _ in batches for t in texts] == row_groups[rank] + row_groups[rank + 2]
        assert all(len(texts) <= 8 for texts, _ in batches)
    # the packed loader on rank 1 only ever reports odd row groups
    as_rank(monkeypatch, 1, 2)
    it = loader_with_state(tok, 2, 32, "train", tokenizer_batch_size=8, buffer_size=16, device="cpu")
    assert {next(it)[2]["rg_idx"] for _ in range(10)} <= {1, 3}


def test_resume_restarts_after_the_saved_row_group(fixture_base_dir, monkeypatch):
    as_rank(monkeypatch, 1, 2)
    # rank 1 saved at row group 1: it continues with its next one, 3
    resumed = one_pass("train", resume={"pq_idx": 0, "rg_idx": 1, "epoch": 1})
    assert {where for _, where in resumed} == {(0, 3, 1)}
    as_rank(monkeypatch, 0, 2)
    # rank 0 saved at row group 2, the last of its shard: next is epoch 2 from the start
    batches = dl._document_batches("train", {"pq_idx": 0, "rg_idx": 2, "epoch": 4}, 8)
    assert next(batches)[1] == (0, 0, 5)
    # a state dict without 'epoch' (older checkpoints) counts from epoch 1
    single_rank(monkeypatch)
    batches = dl._document_batches("train", {"pq_idx": 0, "rg_idx": 0}, 8)
    assert next(batches)[1] == (0, 1, 1)
    # a saved shard index past the end (fewer shards now) starts the next epoch cleanly
    batches = dl._document_batches("train", {"pq_idx": 7, "rg_idx": 3, "epoch": 2}, 8)
    assert next(batches)[1] == (0, 0, 3)

# -----------------------------------------------------------------------------
# Bad input


def test_empty_data_dir_error(tok, fixture_base_dir, monkeypatch):
    single_rank(monkeypatch)
    for p in (fixture_base_dir / "base_data_climbmix").iterdir():
        p.unlink()
    it = loader(tok, 2, 32, "train", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"No pretraining shards.*python -m nanochat\.dataset -n 8"):
        next(it)


def test_too_many_ranks_for_the_data_is_an_error_not_a_hang(tok, fixture_base_dir, monkeypatch):
    as_rank(monkeypatch, 5, 8)  # the train shard has only 4 row groups
    it = loader(tok, 2, 32, "train", device="cpu")
    with pytest.raises(RuntimeError, match=r"rank 5 of 8 has no documents in the train split"):
        next(it)


def test_bad_split(tok, fixture_base_dir):
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        next(loader(tok, 2, 32, "test", device="cpu"))


# -----------------------------------------------------------------------------
# Exact resume (our addition)

@pytest.mark.parametrize("resume_at, packed", [(0, False), (3, True), (7, True)])
def test_exact_resume_replays_the_same_batches(fixture_base_dir, tok, monkeypatch, resume_at, packed):
    single_rank(monkeypatch)
    kwargs = dict(tokenizer_batch_size=8, buffer_size=16, device="cpu", exact_resume=True)
    stream = loader_with_state(tok, 2, 32, "train", **kwargs)
    reference, states = [], []
    for _ in range(12):  # enough batches to cross row groups and an epoch on the fixture data
        x, y, sd = next(stream)
        reference.append((x.clone(), y.clone()))
        states.append(sd)
    assert set(states[0]) == {"pq_idx", "rg_idx", "epoch", "exact"}
    saved = dict(states[resume_at])
    if packed:  # the form nanochat.train writes to disk
        saved["exact"] = dl.pack_doc_buffer(saved["exact"])
    resumed = loader_with_state(tok, 2, 32, "train", resume_state_dict=saved, **kwargs)
    for i in range(resume_at, len(reference)):
        x, y, sd = next(resumed)
        assert torch.equal(x, reference[i][0]) and torch.equal(y, reference[i][1]), f"batch {i}"
        assert {k: sd[k] for k in ("pq_idx", "rg_idx", "epoch")} == {k: states[i][k] for k in ("pq_idx", "rg_idx", "epoch")}


def test_exact_resume_off_keeps_upstream_state_dicts(fixture_base_dir, tok, monkeypatch):
    single_rank(monkeypatch)
    _, _, sd = next(loader_with_state(tok, 2, 32, "train", tokenizer_batch_size=8, buffer_size=16, device="cpu"))
    assert set(sd) == {"pq_idx", "rg_idx", "epoch"}
