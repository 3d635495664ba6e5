"""
Specification of megacontext/storage.py: the {LOD0,LOD1,LOD2}.ctx files (docs/ctx-format.md).

Round trips for every level and gist dtype, the byte layout of the seed header, reading
seed-spec files, crash safety under SIGKILL, detection of torn and corrupted files,
identity checks, refusal of bad input without touching what is on disk, and flat memory
while ingesting a long document.
"""
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from megacontext.storage import (HEADER_SIZE, MAGIC, CtxFormatError, create_ctx, create_tree_dir, gistnet_id,
                                 open_ctx, open_ctx_for_append, open_tree_dir)

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCK = 32


def tokens(n_blocks, seed=0):
    return np.random.default_rng(seed).integers(0, 2**32, size=(n_blocks, BLOCK), dtype=np.uint64).astype(np.uint32)


def gists(n, dim=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def as_bf16_float32(x):
    """What torch stores for x in bf16, widened back to float32 (the reference for our rounding)."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).bfloat16().float().numpy()


def new_gist_file(path, level=1, dim=16, dtype="fp16", model_name="d20", gistnet="gistnet-a", **kw):
    return create_ctx(path, level=level, block_size=BLOCK, embedding_dim=dim, dtype=dtype,
                      model_name=model_name, gistnet=gistnet, **kw)


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


# -----------------------------------------------------------------------------
# round trips

def test_lod0_round_trip_and_slicing(tmp_path):
    data = tokens(10)
    with create_ctx(tmp_path / "LOD0.ctx", level=0, block_size=BLOCK, model_name="d20") as w:
        assert w.append(data[:3]) == 3
        assert w.append(data[3]) == 4              # one block as [block_size]
        w.append(data[4:].tolist())                # plain lists of ints work too
        assert len(w) == 10 and np.array_equal(w[9], data[9])  # a writer reads what it committed
    r = open_ctx(tmp_path / "LOD0.ctx")
    assert len(r) == 10
    assert r[0].shape == (BLOCK,) and r[0].dtype == np.uint32
    assert np.array_equal(r[:], data)
    assert np.array_equal(r[2:7], data[2:7]) and r[2:7].shape == (5, BLOCK)
    assert np.array_equal(r[-1], data[-1])
    assert np.array_equal(r[::3], data[::3])
    assert np.array_equal(np.stack(list(r)), data)
    view = r[1:3]  # random access through the memory map: a read-only view, nothing copied
    assert not view.flags.owndata and not view.flags.writeable
    assert r.tensor(slice(0, 2)).dtype == torch.int64
    assert torch.equal(r.tensor(slice(0, 2)), torch.from_numpy(data[:2].astype(np.int64)))
    with pytest.raises(IndexError, match="10 committed entries"):
        r[10]
    with pytest.raises(IndexError):
        r[-11]
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r[0]


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gist_round_trip(tmp_path, level, dtype):
    x = gists(7, dim=24)
    path = tmp_path / f"LOD{level}.ctx"
    with new_gist_file(path, level=level, dim=24, dtype=dtype) as w:
        w.append(x[:4])
        w.append(torch.from_numpy(x[4:]))
    r = open_ctx(path)
    assert len(r) == 7 and r[3].shape == (24,) and r[1:3].shape == (2, 24)
    if dtype == "fp16":
        assert r[0].dtype == np.float16
        assert np.array_equal(r[:], x.astype(np.float16))
        assert torch.equal(r.tensor(slice(None)), torch.from_numpy(x).half())
    else:
        # bf16 comes back as float32, rounded to nearest even exactly as torch does it
        assert r[0].dtype == np.float32
        assert np.array_equal(r[:], as_bf16_float32(x))
        assert r.read_raw(0).dtype == np.uint16
        assert torch.equal(r.tensor(slice(None)), torch.from_numpy(x).bfloat16())
    assert r.tokens_per_entry == BLOCK ** level


def test_bf16_tensor_bits_stored_exactly(tmp_path):
    t = torch.randn(5, 16).bfloat16()
    with new_gist_file(tmp_path / "g.ctx", dtype="bf16") as w:
        w.append(t)
    r = open_ctx(tmp_path / "g.ctx")
    assert np.array_equal(r.read_raw(slice(None)), t.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(r.tensor(slice(None)), t)


def test_bf16_rounding_matches_torch_on_hard_cases(tmp_path):
    # ties, subnormals, values that round up into the next binade, and the largest finite bf16
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x00000001, 0x807FFFFF, 0x7F7F0000, 0x3FFFFFFF],
                    dtype=np.uint32)
    x = bits.view(np.float32).reshape(1, -1)
    with new_gist_file(tmp_path / "g.ctx", dim=7, dtype="bf16") as w:
        w.append(x)
    got = open_ctx(tmp_path / "g.ctx")[0]
    assert np.array_equal(got.view(np.uint32), as_bf16_float32(x)[0].view(np.uint32))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.integers(0, 6), min_size=1, max_size=6), dtype=st.sampled_from(["fp16", "bf16"]),
       reopen_every=st.integers(1, 3))
def test_chunked_appends_with_reopens_read_back(tmp_path_factory, chunks, dtype, reopen_every):
    path = tmp_path_factory.mktemp("h") / "LOD1.ctx"
    expected = []
    w = new_gist_file(path, dim=8, dtype=dtype, durable=False)
    for k, n in enumerate(chunks):
        x = gists(n, dim=8, seed=k)
        w.append(x.reshape(n, 8))
        expected.append(x)
        if k % reopen_every == 0:
            w.close()
            w = open_ctx_for_append(path, durable=False)
    w.close()
    want = np.concatenate(expected).reshape(-1, 8)
    want = want.astype(np.float16) if dtype == "fp16" else as_bf16_float32(want)
    r = open_ctx(path)
    assert len(r) == sum(chunks)
    assert np.array_equal(np.asarray(r[:], dtype=np.float32), np.asarray(want, dtype=np.float32))
    assert r.verify() is True


def test_reader_refresh_follows_a_writer(tmp_path):
    w = create_ctx(tmp_path / "LOD0.ctx", level=0, model_name="d20")
    w.append(tokens(2))
    r = open_ctx(tmp_path / "LOD0.ctx")
    w.append(tokens(3, seed=1))
    assert len(r) == 2  # a reader sees the state committed when it was opened
    assert r.refresh() == 5
    assert np.array_equal(r[2:], tokens(3, seed=1))
    w.close()


# -----------------------------------------------------------------------------
# the header

def test_header_fields_and_seed_byte_layout(tmp_path):
    path = tmp_path / "LOD2.ctx"
    with new_gist_file(path, level=2, dim=768, dtype="bf16", model_name="nanochat-d20") as w:
        w.append(gists(3, dim=768))
    r = open_ctx(path)
    assert r.header == {"magic": 0x4D434354, "version": 1, "level": 2, "block_size": 32,
                        "embedding_dim": 768, "dtype_code": 2, "model_name": "nanochat-d20"}
    raw = path.read_bytes()
    assert len(raw) == HEADER_SIZE + 3 * 768 * 2  # entry i of a gist level at 64 + i*d*2
    assert struct.unpack_from("<IHHHHH", raw, 0) == (MAGIC, 1, 2, 32, 768, 2)
    assert raw[14:46] == b"nanochat-d20".ljust(32, b"\0")
    # our reserved bytes: count u32, payload crc32 u32, gistnet id u32, flags u16, header crc32 u32
    count, crc, gid, flags, hcrc = struct.unpack_from("<IIIHI", raw, 46)
    assert count == 3 and flags == 1
    assert crc == zlib.crc32(raw[HEADER_SIZE:])
    assert gid == gistnet_id("gistnet-a") == r.gistnet_id
    assert hcrc == zlib.crc32(raw[:60])
    assert np.array_equal(np.frombuffer(raw, "<u2", 768, HEADER_SIZE + 768 * 2),
                          r.read_raw(1))
    assert r.commit_info == {"committed_count": 3, "payload_crc32": crc, "gistnet_id": gid,
                             "flags": 1, "seed_spec": False}


def test_stale_flag_is_bit_1_and_survives_appends_and_reopens(tmp_path):
    path = tmp_path / "LOD1.ctx"
    with new_gist_file(path, stale=True) as w:
        w.append(gists(2))
    with open_ctx_for_append(path) as w:  # appends keep the flag: the old gists are still in the file
        w.append(gists(1, seed=1))
    r = open_ctx(path)
    assert r.holds_stale_gists and len(r) == 3
    assert struct.unpack_from("<H", path.read_bytes(), 58)[0] == 0b11 and r.commit_info["flags"] == 3
    with new_gist_file(tmp_path / "plain.ctx") as w:
        assert not w.holds_stale_gists
    with pytest.raises(ValueError, match="LOD0 holds token ids, which are never stale"):
        create_ctx(tmp_path / "LOD0.ctx", level=0, model_name="m", stale=True)
    assert not (tmp_path / "LOD0.ctx").exists()


def test_a_reader_knows_when_its_path_names_another_file(tmp_path):
    path = tmp_path / "LOD1.ctx"
    with new_gist_file(path) as w:
        w.append(gists(2))
    r = open_ctx(path)
    assert not r.is_replaced()
    with new_gist_file(tmp_path / "new.ctx", gistnet="gistnet-b") as w:
        w.append(gists(4, seed=1))
    os.replace(tmp_path / "new.ctx", path)  # what a tree refresh does
    assert r.is_replaced() and len(r) == 2 and r.refresh() == 2  # still the old file, as it was
    assert np.array_equal(r[:], gists(2).astype(np.float16))
    path.unlink()
    assert r.is_replaced()
    r.close()


def test_lod0_layout_is_whole_blocks_of_uint32(tmp_path):
    data = tokens(4)
    with create_ctx(tmp_path / "LOD0.ctx", level=0, embedding_dim=0, model_name="m") as w:
        w.append(data)
    raw = (tmp_path / "LOD0.ctx").read_bytes()
    assert np.array_equal(np.frombuffer(raw, "<u4", offset=HEADER_SIZE).reshape(4, BLOCK), data)


def test_gistnet_id_is_stable_and_nonzero():
    assert gistnet_id(None) == 0
    assert gistnet_id("gistnet-a") == gistnet_id(b"gistnet-a") != gistnet_id("gistnet-b")
    assert gistnet_id(0x1234) == 0x1234
    assert 0 < gistnet_id("x") < 2**32
    for bad in ["", 0, 2**32, True]:
        with pytest.raises(ValueError):
            gistnet_id(bad)


# -----------------------------------------------------------------------------
# files written to the seed spec (reserved bytes all zero)

def write_seed_file(path, level, entries, block_size=BLOCK, dim=0, dtype_code=0, model_name=b"seed-model",
                    extra=b""):
    header = struct.pack("<IHHHHH32s", MAGIC, 1, level, block_size, dim, dtype_code, model_name) + bytes(18)
    assert len(header) == 64
    path.write_bytes(header + entries.tobytes() + extra)


def test_seed_spec_file_reads_with_count_from_size(tmp_path):
    data = tokens(5)
    write_seed_file(tmp_path / "LOD0.ctx", 0, data, extra=b"\x01\x02\x03")  # plus a partial entry
    r = open_ctx(tmp_path / "LOD0.ctx")
    assert r.seed_spec and len(r) == 5 and r.torn_tail_bytes == 3
    assert np.array_equal(r[:], data)
    assert r.header["model_name"] == "seed-model"
    assert r.verify() is False  # no checksum recorded: nothing to verify
    assert r.commit_info["payload_crc32"] is None

    x = gists(3).astype(np.float16)
    write_seed_file(tmp_path / "LOD1.ctx", 1, x, dim=16, dtype_code=1)
    assert np.array_equal(open_ctx(tmp_path / "LOD1.ctx")[:], x)


def test_seed_spec_file_is_adopted_for_append(tmp_path):
    data = tokens(5)
    path = tmp_path / "LOD0.ctx"
    write_seed_file(path, 0, data, extra=b"\x09" * 7)
    with open_ctx_for_append(path) as w:
        assert w.adopted_seed_spec
        w.append(tokens(2, seed=3))
    r = open_ctx(path)
    assert not r.seed_spec and len(r) == 7 and r.torn_tail_bytes == 0
    assert np.array_equal(r[:5], data) and np.array_equal(r[5:], tokens(2, seed=3))
    assert r.verify() is True


def test_seed_spec_gist_file_adopts_the_requested_gistnet(tmp_path):
    path = tmp_path / "LOD1.ctx"
    write_seed_file(path, 1, gists(2).astype(np.float16), dim=16, dtype_code=1, model_name=b"d20")
    with new_gist_file(path, exist_ok=True, gistnet="gistnet-a") as w:
        w.append(gists(1))
    r = open_ctx(path, expect_gistnet="gistnet-a", expect_model_name="d20")
    assert len(r) == 3


# -----------------------------------------------------------------------------
# crash safety: SIGKILL a writer at random points, the reader sees a committed prefix

CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from megacontext.storage import create_ctx

    path, level, dtype, durable, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", sys.argv[5]

    def entry(i):
        if level == 0:
            return (np.arange(32, dtype=np.uint64) * 2654435761 + i).astype(np.uint32)
        return np.random.default_rng(i).standard_normal(16).astype(np.float32)

    if crash != "random":
        # deterministic crash points: wrap os.pwrite, which the writer uses for both payload and commit
        real_pwrite, appends = os.pwrite, [0]
        def pwrite(fd, data, offset):
            if appends[0] >= 3:
                if crash == "before_commit" and offset == 46:
                    os.kill(os.getpid(), signal.SIGKILL)
                if crash == "mid_payload" and offset >= 64:
                    data = bytes(data)
                    real_pwrite(fd, data[: len(data) // 2 + 1], offset)
                    os.kill(os.getpid(), signal.SIGKILL)
            if offset == 46:
                appends[0] += 1
            return real_pwrite(fd, data, offset)
        os.pwrite = pwrite

    w = create_ctx(path, level=level, block_size=32, embedding_dim=0 if level == 0 else 16,
                   dtype=dtype, model_name="d20", gistnet=None if level == 0 else "gistnet-a",
                   exist_ok=True, durable=durable)
    i = len(w)
    while True:
        k = 1 + i % 4
        w.append(np.stack([entry(j) for j in range(i, i + k)]))
        if i == len(w) - k and crash == "random":
            print("ready", i, flush=True)  # after the first append: warm, so kills land inside the loop
        i += k
""")


def child_entry(level, i):
    if level == 0:
        return (np.arange(32, dtype=np.uint64) * 2654435761 + i).astype(np.uint32)
    return np.random.default_rng(i).standard_normal(16).astype(np.float32)


def run_child(path, level, dtype, durable, crash):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(level), dtype, str(int(durable)), crash],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def assert_committed_prefix(path, level, dtype):
    r = open_ctx(path)  # verifies the payload checksum on open
    n = len(r)
    want = np.stack([child_entry(level, i) for i in range(n)]) if n else np.zeros((0, r.entry_shape[0]))
    if level == 0:
        assert np.array_equal(r[:], want)
    else:
        want = want.astype(np.float16) if dtype == "fp16" else as_bf16_float32(want)
        assert np.array_equal(np.asarray(r[:], np.float32), np.asarray(want, np.float32))
    assert r.compute_payload_crc32() == r.commit_info["payload_crc32"]
    r.close()
    return n


@pytest.mark.parametrize("level,dtype,durable", [(0, "uint32", True), (1, "bf16", False), (2, "fp16", True)])
def test_sigkill_at_random_points_leaves_a_committed_prefix(tmp_path, level, dtype, durable):
    path = tmp_path / f"LOD{level}.ctx"
    rng = random.Random(1234 + level)
    counts = []
    for _ in range(4):
        child = run_child(path, level, dtype, durable, "random")
        assert child.stdout.readline().startswith("ready"), child.stderr.read()
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        child.stderr.close()
        counts.append(assert_committed_prefix(path, level, dtype))
    assert counts == sorted(counts) and counts[-1] > 0  # commits are never lost across restarts


@pytest.mark.parametrize("crash", ["before_commit", "mid_payload"])
def test_crash_inside_an_append_is_a_torn_tail(tmp_path, crash):
    path = tmp_path / "LOD0.ctx"
    child = run_child(path, 0, "uint32", True, crash)
    child.wait(timeout=60)
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    # three appends committed (1 + 2 + 4 entries); the fourth's payload is on disk, uncommitted
    r = open_ctx(path)
    assert len(r) == 7 and r.torn_tail_bytes > 0
    assert assert_committed_prefix(path, 0, "uint32") == 7
    with open_ctx_for_append(path) as w:  # reopening cuts the tail before appending
        assert w.torn_tail_bytes == 0
        assert os.path.getsize(path) == HEADER_SIZE + 7 * BLOCK * 4
        w.append(np.stack([child_entry(0, i) for i in range(7, 10)]))
    assert assert_committed_prefix(path, 0, "uint32") == 10


# -----------------------------------------------------------------------------
# torn and corrupted files are reported, never silently read

def make_lod0(path, n=4):
    with create_ctx(path, level=0, model_name="d20") as w:
        w.append(tokens(n))
    return path


def test_torn_tail_is_dropped(tmp_path):
    path = make_lod0(tmp_path / "LOD0.ctx")
    with open(path, "ab") as f:
        f.write(tokens(1, seed=9).tobytes() + b"\x01\x02")  # a whole entry and a half: both uncommitted
    r = open_ctx(path)
    assert len(r) == 4 and r.torn_tail_bytes == BLOCK * 4 + 2
    assert np.array_equal(r[:], tokens(4))


def test_payload_corruption_is_detected(tmp_path):
    path = make_lod0(tmp_path / "LOD0.ctx")
    flip_byte(path, HEADER_SIZE + 200)
    with pytest.raises(CtxFormatError, match="corrupted: payload CRC32"):
        open_ctx(path)
    r = open_ctx(path, verify=False)  # opt out of the check on open, then ask for it
    with pytest.raises(CtxFormatError, match="corrupted"):
        r.verify()
    with pytest.raises(CtxFormatError, match="corrupted"):
        open_ctx_for_append(path)


@pytest.mark.parametrize("offset", [15, 47, 55, 61])  # model_name, count, payload crc, header crc
def test_header_corruption_is_detected(tmp_path, offset):
    path = make_lod0(tmp_path / "LOD0.ctx")
    flip_byte(path, offset)
    with pytest.raises(CtxFormatError, match="header checksum mismatch"):
        open_ctx(path)


def test_torn_commit_record_is_detected(tmp_path):
    path = make_lod0(tmp_path / "LOD0.ctx")
    with open(path, "r+b") as f:  # only the new count reached the disk, not the checksums
        f.seek(46)
        f.write(struct.pack("<I", 5))
    with pytest.raises(CtxFormatError, match="torn or corrupted"):
        open_ctx(path)


def test_missing_committed_bytes_are_detected(tmp_path):
    path = make_lod0(tmp_path / "LOD0.ctx")
    os.truncate(path, os.path.getsize(path) - 1)
    with pytest.raises(CtxFormatError, match="truncated: its header commits 4 entries but only 3"):
        open_ctx(path, verify=False)


def test_other_version_magic_and_short_files_are_refused(tmp_path):
    path = make_lod0(tmp_path / "LOD0.ctx")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<H", raw, 4, 2)
    (tmp_path / "v2.ctx").write_bytes(bytes(raw))
    with pytest.raises(CtxFormatError, match="format version 2.*reads version 1"):
        open_ctx(tmp_path / "v2.ctx")
    (tmp_path / "text.ctx").write_bytes(b"hello, this is not a ctx file at all" * 4)
    with pytest.raises(CtxFormatError, match="not a MegaContext .ctx file"):
        open_ctx(tmp_path / "text.ctx")
    (tmp_path / "empty.ctx").write_bytes(b"")
    with pytest.raises(CtxFormatError, match="empty file"):
        open_ctx(tmp_path / "empty.ctx")
    (tmp_path / "short.ctx").write_bytes(raw[:30])
    with pytest.raises(CtxFormatError, match="only 30 bytes"):
        open_ctx(tmp_path / "short.ctx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_ctx(tmp_path / "nope.ctx")
    with pytest.raises(CtxFormatError, match="format version 2"):
        open_ctx_for_append(tmp_path / "v2.ctx")
    assert (tmp_path / "v2.ctx").read_bytes() == bytes(raw)  # refused untouched


# -----------------------------------------------------------------------------
# bad input: clear errors, nothing already on disk is lost

@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 16), np.int64), "block_size=32 token ids; got shape \\(2, 16\\)"),
    (np.zeros(48, np.int64), "block_size=32 token ids; got shape \\(48,\\)"),
    (np.zeros((2, 32), np.float32), "token ids must be integers"),
    (np.full((1, 32), -1), "token ids must be in 0..2\\*\\*32-1"),
    (np.full((1, 32), 2**32), "token ids must be in 0..2\\*\\*32-1"),
    (np.array([]), "got shape \\(0,\\)"),
])
def test_bad_token_appends_are_refused_and_lose_nothing(tmp_path, bad, match):
    path = make_lod0(tmp_path / "LOD0.ctx")
    before = path.read_bytes()
    with open_ctx_for_append(path) as w:
        with pytest.raises(ValueError, match=match):
            w.append(bad)
        assert len(w) == 4
    assert path.read_bytes() == before


@pytest.mark.parametrize("bad,match", [
    (np.zeros((3, 32), np.float32), "embedding_dim=16; got shape \\(3, 32\\)"),
    (np.zeros(768, np.float32), "embedding_dim=16"),
    (np.zeros((1, 16), np.int32), "gists must be floating point"),
    (np.full((1, 16), np.nan, np.float32), "NaN or inf"),
    (np.full((1, 16), 1e6, np.float32), "beyond the float16 range"),
])
def test_bad_gist_appends_are_refused_and_lose_nothing(tmp_path, bad, match):
    path = tmp_path / "LOD1.ctx"
    with new_gist_file(path) as w:
        w.append(gists(2))
    before = path.read_bytes()
    with open_ctx_for_append(path) as w:
        with pytest.raises(ValueError, match=match):
            w.append(bad)
    assert path.read_bytes() == before


def test_bf16_overflow_is_refused(tmp_path):
    with new_gist_file(tmp_path / "g.ctx", dtype="bf16") as w:
        with pytest.raises(ValueError, match="beyond the bfloat16 range"):
            w.append(np.full((1, 16), 3.4e38, np.float32))  # finite in float32, rounds to inf in bf16


@pytest.mark.parametrize("kwargs,match", [
    (dict(level=1, embedding_dim=0, model_name="m"), "embedding_dim must be the model's width"),
    (dict(level=0, dtype="fp16", model_name="m"), "LOD0 holds token ids and must be uint32"),
    (dict(level=1, embedding_dim=8, dtype="uint32", model_name="m"), "must be fp16 or bf16"),
    (dict(level=3, model_name="m"), "level must be 0, 1 or 2"),
    (dict(level=0, block_size=0, model_name="m"), "block_size must be in 1..65535"),
    (dict(level=1, embedding_dim=8, dtype="fp8", model_name="m"), "unknown .ctx dtype"),
    (dict(level=0, model_name="x" * 32), "at most 31 UTF-8 bytes"),
    (dict(level=0, model_name=""), "non-empty string"),
    (dict(level=0, model_name="m", gistnet="g"), "LOD0 holds token ids and has no GistNet"),
])
def test_bad_create_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_ctx(tmp_path / "x.ctx", **kwargs)
    assert not (tmp_path / "x.ctx").exists()


def test_existing_file_is_never_overwritten(tmp_path):
    path = make_lod0(tmp_path / "LOD0.ctx")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="exist_ok=True"):
        create_ctx(path, level=0, model_name="d20")
    with pytest.raises(ValueError, match="block_size=32, but 16 was requested"):
        create_ctx(path, level=0, block_size=16, model_name="d20", exist_ok=True)
    with pytest.raises(ValueError, match="model_name='d20', but 'd32' was requested"):
        create_ctx(path, level=0, model_name="d32", exist_ok=True)
    assert path.read_bytes() == before
    with create_ctx(path, level=0, model_name="d20", exist_ok=True) as w:  # same header: resume
        w.append(tokens(1, seed=5))
    assert len(open_ctx(path)) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_gist_file_mismatches_on_resume_name_both_sides(tmp_path):
    path = tmp_path / "LOD1.ctx"
    with new_gist_file(path, dtype="bf16", gistnet="gistnet-a") as w:
        w.append(gists(1))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="embedding_dim=16, but 32 was requested"):
        new_gist_file(path, dim=32, dtype="bf16", exist_ok=True)
    with pytest.raises(ValueError, match="dtype_code=bfloat16, but float16 was requested"):
        new_gist_file(path, dtype="fp16", exist_ok=True)
    with pytest.raises(ValueError, match=f"gistnet_id=0x{gistnet_id('gistnet-a'):08X}, but "
                                         f"0x{gistnet_id('gistnet-b'):08X} was requested"):
        new_gist_file(path, dtype="bf16", gistnet="gistnet-b", exist_ok=True)
    assert path.read_bytes() == before


def test_one_writer_at_a_time(tmp_path):
    path = make_lod0(tmp_path / "LOD0.ctx")
    with open_ctx_for_append(path):
        with pytest.raises(RuntimeError, match="already open for appending"):
            open_ctx_for_append(path)
    open_ctx_for_append(path).close()  # the lock goes with the writer


TRY_APPEND = textwrap.dedent("""
    import sys
    from megacontext.storage import open_ctx_for_append
    try:
        open_ctx_for_append(sys.argv[1]).close()
        print("opened")
    except RuntimeError as e:
        print("refused:", e)
""")


def try_append_in_subprocess(path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", TRY_APPEND, str(path)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def open_fd_count():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def test_live_views_do_not_keep_the_writer_lock(tmp_path):
    # mmap duplicates the descriptor it maps, so a flock taken on that descriptor would outlive
    # close() for as long as any view of the map is alive; the lock must go with close() anyway
    path = tmp_path / "LOD0.ctx"
    data = tokens(6)
    w = create_ctx(path, level=0, model_name="d20")
    w.append(data[:3])
    writer_views = [w[0:3], w[1], w.read_raw(slice(None))]
    reader = open_ctx(path)  # kept open and unreferenced-until-the-end: its map stays alive too
    reader_view = reader[0:3]
    fds_with_writer = open_fd_count()
    w.close()
    if fds_with_writer is not None:  # the lock descriptor is closed, not leaked
        assert open_fd_count() <= fds_with_writer - 2

    w2 = open_ctx_for_append(path)  # the same process reopens at once
    try:
        w2.append(data[3:])
        # while a writer is open, every other writer is refused: same process (both openers) ...
        with pytest.raises(RuntimeError, match="already open for appending by another writer"):
            open_ctx_for_append(path)
        with pytest.raises(RuntimeError, match="already open for appending by another writer"):
            create_ctx(path, level=0, model_name="d20", exist_ok=True)
        # ... and another process
        assert try_append_in_subprocess(path).startswith("refused:")
        assert np.array_equal(w2[:], data)
    finally:
        w2.close()
    assert try_append_in_subprocess(path) == "opened"

    # the old views still show the entries committed when they were taken
    assert np.array_equal(writer_views[0], data[:3]) and np.array_equal(writer_views[1], data[1])
    assert np.array_equal(writer_views[2], data[:3]) and np.array_equal(reader_view, data[:3])
    assert reader.refresh() == 6 and np.array_equal(reader[:], data)
    reader.close()


# -----------------------------------------------------------------------------
# identity: gists from another model or GistNet are refused

def test_identity_is_checked_on_open(tmp_path):
    path = tmp_path / "LOD1.ctx"
    with new_gist_file(path, model_name="d20", gistnet="gistnet-a") as w:
        w.append(gists(2))
    open_ctx(path, expect_model_name="d20", expect_gistnet="gistnet-a").close()
    open_ctx(path, expect_gistnet=gistnet_id("gistnet-a")).close()
    with pytest.raises(ValueError, match="written for base model 'd20', not 'd32'"):
        open_ctx(path, expect_model_name="d32")
    with pytest.raises(ValueError, match=f"made by GistNet id 0x{gistnet_id('gistnet-a'):08X}, "
                                         f"not by GistNet 'gistnet-b'"):
        open_ctx(path, expect_gistnet="gistnet-b")
    with pytest.raises(ValueError, match="LOD1 file, expected LOD2"):
        open_ctx(path, expect_level=2)
    with pytest.raises(ValueError, match="not by GistNet 'gistnet-b'"):
        open_ctx_for_append(path, expect_gistnet="gistnet-b")


def test_tree_dir_round_trip_and_cross_checks(tmp_path):
    tree = tmp_path / "tree"
    writers = create_tree_dir(tree, embedding_dim=16, dtype="bf16", model_name="d20", gistnet="gistnet-a")
    writers[0].append(tokens(64))
    writers[1].append(gists(64))
    writers[2].append(gists(2))
    for w in writers:
        w.close()
    lod0, lod1, lod2 = open_tree_dir(tree, expect_model_name="d20", expect_gistnet="gistnet-a")
    assert (len(lod0), len(lod1), len(lod2)) == (64, 64, 2)
    assert lod0.header["embedding_dim"] == 16 and lod2.header["dtype_code"] == 2
    with pytest.raises(ValueError, match="not by GistNet 'gistnet-b'"):
        open_tree_dir(tree, expect_gistnet="gistnet-b")
    # a LOD2 gist needs 32 LOD1 gists under it
    with open_ctx_for_append(tree / "LOD2.ctx") as w:
        w.append(gists(1))
    with pytest.raises(CtxFormatError, match="LOD2.ctx has 3 gists"):
        open_tree_dir(tree)
    (tree / "LOD1.ctx").unlink()
    with pytest.raises(FileNotFoundError, match="missing LOD1.ctx"):
        open_tree_dir(tree)


def test_tree_levels_from_different_models_are_refused(tmp_path):
    create_tree_dir(tmp_path / "a", embedding_dim=16, model_name="d20", gistnet="g")
    create_tree_dir(tmp_path / "b", embedding_dim=16, model_name="d32", gistnet="g")
    os.replace(tmp_path / "b" / "LOD1.ctx", tmp_path / "a" / "LOD1.ctx")
    with pytest.raises(CtxFormatError, match="model_name='d32'.*different trees"):
        open_tree_dir(tmp_path / "a")


# -----------------------------------------------------------------------------
# memory: ingesting a long document keeps RAM flat in its length

def ingest_peak_bytes(path, n_tokens, chunk_blocks=128):
    """Peak traced allocation while streaming n_tokens into LOD0 and verifying it on reopen."""
    rng = np.random.default_rng(0)
    tracemalloc.start()
    with create_ctx(path, level=0, model_name="d20", durable=False) as w:
        for start in range(0, n_tokens // BLOCK, chunk_blocks):
            n = min(chunk_blocks, n_tokens // BLOCK - start)
            w.append(rng.integers(0, 65536, size=(n, BLOCK), dtype=np.uint32))
    r = open_ctx(path)  # checksums the whole payload on open
    total = int(r[:, 0].astype(np.uint64).sum())  # touch every entry through the memmap
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(r) == n_tokens // BLOCK and total > 0
    r.close()
    return peak


def test_ingest_of_a_million_tokens_keeps_memory_flat(tmp_path):
    n_tokens = 1 << 20
    peak_small = ingest_peak_bytes(tmp_path / "small.ctx", n_tokens // 4)
    peak_big = ingest_peak_bytes(tmp_path / "big.ctx", n_tokens)
    assert os.path.getsize(tmp_path / "big.ctx") == HEADER_SIZE + 4 * n_tokens
    # the document is 4 MiB of token ids; the peak is a fixed checksum buffer plus one chunk
    assert peak_big < 1.6 * 2**20, peak_big
    assert peak_big < 1.25 * peak_small, (peak_small, peak_big)  # 4x the document, same peak
