"""
On-disk storage of the MegaContext Tree: one `.ctx` file per level of detail.

LOD0.ctx holds token ids in whole blocks, LOD1.ctx and LOD2.ctx hold gist vectors.
Each file is a 64-byte header followed by fixed-width entries, so entry i sits at a
computed byte offset and is read through a memory map without touching the rest of
the file. The byte layout and the commit protocol are specified in docs/ctx-format.md.

Usage:
    with create_ctx("tree/LOD1.ctx", level=1, embedding_dim=768, dtype="bf16",
                    model_name="d20", gistnet="gistnet-d20-step5000") as w:
        w.append(gists)                      # [n, 768] or [768]; one commit per call
    r = open_ctx("tree/LOD1.ctx", expect_model_name="d20", expect_gistnet="gistnet-d20-step5000")
    r.header, len(r), r[3], r[10:20]

This module owns bytes on disk: layout, crash-safe appends, integrity checks and the
identity checks (base model by name, GistNet by id). It never runs a model, never
tokenizes text and never decides what goes into the tree (megacontext/tree.py does).
It must stay importable without torch.
"""

import fcntl
import hashlib
import mmap
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

MAGIC = 0x4D434354  # 'MCCT' read as a little-endian u32
VERSION = 1
HEADER_SIZE = 64
LEVEL_FILENAMES = ("LOD0.ctx", "LOD1.ctx", "LOD2.ctx")

DTYPE_UINT32, DTYPE_FP16, DTYPE_BF16 = 0, 1, 2
DTYPE_NAMES = {DTYPE_UINT32: "uint32", DTYPE_FP16: "float16", DTYPE_BF16: "bfloat16"}
_DTYPE_ALIASES = {"uint32": 0, "u32": 0, "float16": 1, "fp16": 1, "half": 1, "bfloat16": 2, "bf16": 2}
# what the memory map holds: bf16 has no numpy dtype, so its raw bits are mapped as uint16
_STORAGE_DTYPES = {DTYPE_UINT32: np.dtype("<u4"), DTYPE_FP16: np.dtype("<f2"), DTYPE_BF16: np.dtype("<u2")}

# The seed's header fields (bytes 0..45), then our use of the 18 reserved bytes (46..63):
# committed entry count, running CRC32 of the committed payload, GistNet id, flags, and a
# CRC32 of bytes 0..59 so a torn or damaged header can never pass for a valid one.
_SEED_FIELDS = struct.Struct("<IHHHHH32s")
_COMMIT_FIELDS = struct.Struct("<IIIH")
_HEADER_CRC = struct.Struct("<I")
_SEED_END, _CRC_AT = 46, 60
assert _SEED_FIELDS.size == _SEED_END and _SEED_END + _COMMIT_FIELDS.size == _CRC_AT
FLAG_COMMITTED = 0x0001  # reserved bytes are in use (a seed-spec file has them all zero)
# Gist files only: some entries were made by an earlier GistNet than gistnet_id (a refresh of a
# block range; tree.json lists which). Kept in the file itself, so a lost tree.json can never
# make a mixed file pass as one GistNet's; readers older than this bit refuse such files.
FLAG_STALE = 0x0002
_KNOWN_FLAGS = FLAG_COMMITTED | FLAG_STALE
MAX_ENTRIES = 2**32 - 1  # the committed count is a u32
_CHUNK_BYTES = 1 << 20   # checksums are computed through a fixed buffer, so RAM stays flat

_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class CtxFormatError(ValueError):
    """A .ctx file cannot be read as committed data: not a .ctx file, another format version,
    a damaged header, committed bytes missing, or a payload checksum mismatch."""


def gistnet_id(identity):
    """The u32 stored in a gist file for a GistNet identity.

    `identity` is a name or weights fingerprint (str or bytes; hashed with SHA-256, first 4
    bytes little-endian, 0 mapped to 1 since 0 means "no GistNet"), an id that is already an
    int, or None (no GistNet, 0)."""
    if identity is None:
        return 0
    if isinstance(identity, bool):
        raise ValueError(f"GistNet identity must be a name or an id, got {identity!r}")
    if isinstance(identity, (int, np.integer)):
        if not 0 < int(identity) <= 0xFFFFFFFF:
            raise ValueError(f"GistNet id must be in 1..2**32-1, got {identity}")
        return int(identity)
    data = identity.encode("utf-8") if isinstance(identity, str) else bytes(identity)
    if not data:
        raise ValueError("GistNet identity is empty; pass the GistNet's name or weights fingerprint")
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "little") or 1


def _dtype_code(dtype, level):
    """Accept 'fp16'/'bf16'/'uint32', numpy or torch dtypes, or a raw code; None = level default."""
    if dtype is None:
        return DTYPE_UINT32 if level == 0 else DTYPE_FP16
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        key = int(dtype)
        if key in DTYPE_NAMES:
            return key
    elif isinstance(dtype, str):
        key = dtype.lower()
    elif str(dtype).startswith("torch."):
        key = str(dtype)[len("torch."):]
    else:
        try:
            key = np.dtype(dtype).name
        except TypeError:
            key = str(dtype)
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    raise ValueError(f"unknown .ctx dtype {dtype!r}; use 'uint32' (LOD0), 'fp16' or 'bf16' (gists)")


def _layout_problem(level, block_size, embedding_dim, dtype_code):
    """Why these header values cannot describe a .ctx file, or None when they can."""
    if level not in (0, 1, 2):
        return f"level must be 0, 1 or 2, got {level}"
    if not 0 < block_size <= 0xFFFF:
        return f"block_size must be in 1..65535, got {block_size}"
    if not 0 <= embedding_dim <= 0xFFFF:
        return f"embedding_dim must be in 0..65535, got {embedding_dim}"
    if dtype_code not in DTYPE_NAMES:
        return f"dtype_code must be 0 (uint32), 1 (fp16) or 2 (bf16), got {dtype_code}"
    if level == 0 and dtype_code != DTYPE_UINT32:
        return f"LOD0 holds token ids and must be uint32, got {DTYPE_NAMES[dtype_code]}"
    if level > 0 and dtype_code == DTYPE_UINT32:
        return f"LOD{level} holds gists and must be fp16 or bf16, not uint32"
    if level > 0 and embedding_dim == 0:
        return f"LOD{level} holds gists, so embedding_dim must be the model's width (> 0), got 0"
    return None


def _encode_model_name(model_name):
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string naming the base model, got {model_name!r}")
    raw = model_name.encode("utf-8")
    if b"\0" in raw or len(raw) > 31:
        raise ValueError(f"model_name {model_name!r} must be at most 31 UTF-8 bytes without NUL "
                         f"(it is stored NUL-terminated in char[32]); it is {len(raw)} bytes")
    return raw.ljust(32, b"\0")


@dataclass(frozen=True)
class _Header:
    """Everything in the 64-byte header, decoded."""
    level: int
    block_size: int
    embedding_dim: int
    dtype_code: int
    model_name: str
    version: int = VERSION
    count: int = 0          # committed entries (seed-spec files: whole entries in the file)
    payload_crc: int = 0    # CRC32 of the committed payload bytes
    gistnet_id: int = 0
    flags: int = 0          # 0: a seed-spec file with zeroed reserved bytes

    @property
    def seed_spec(self):
        return not self.flags & FLAG_COMMITTED

    @property
    def entry_width(self):
        return self.block_size if self.level == 0 else self.embedding_dim

    @property
    def entry_bytes(self):
        return self.entry_width * _STORAGE_DTYPES[self.dtype_code].itemsize

    def seed_bytes(self):
        name = self.model_name.encode("utf-8").ljust(32, b"\0")
        return _SEED_FIELDS.pack(MAGIC, self.version, self.level, self.block_size,
                                 self.embedding_dim, self.dtype_code, name)

    def reserved_bytes(self):
        """Bytes 46..63; written in a single pwrite to commit an append."""
        commit = _COMMIT_FIELDS.pack(self.count, self.payload_crc, self.gistnet_id, self.flags)
        return commit + _HEADER_CRC.pack(zlib.crc32(self.seed_bytes() + commit))


class _TornHeader(CtxFormatError):
    pass


def _parse_header(raw, name):
    if len(raw) < HEADER_SIZE:
        what = "an empty file" if not raw else f"only {len(raw)} bytes"
        raise CtxFormatError(f"{name} is {what}, shorter than the 64-byte .ctx header; "
                             f"it is not a .ctx file or was cut short (recreate it)")
    magic, version, level, block_size, dim, dtype_code, name_raw = _SEED_FIELDS.unpack_from(raw)
    if magic != MAGIC:
        raise CtxFormatError(f"{name} is not a MegaContext .ctx file (magic 0x{magic:08X}, expected 0x{MAGIC:08X})")
    if version != VERSION:
        raise CtxFormatError(f"{name} is .ctx format version {version}, but this build reads version {VERSION} "
                             f"only; read it with the megacontext release that wrote it, or rebuild the tree")
    reserved = bytes(raw[_SEED_END:HEADER_SIZE])
    count = crc = gid = flags = 0
    if any(reserved):
        count, crc, gid, flags = _COMMIT_FIELDS.unpack_from(raw, _SEED_END)
        (stored,) = _HEADER_CRC.unpack_from(raw, _CRC_AT)
        computed = zlib.crc32(bytes(raw[:_CRC_AT]))
        if stored != computed:
            raise _TornHeader(f"{name}: header checksum mismatch (stored 0x{stored:08X}, computed 0x{computed:08X}); "
                              f"the header is torn or corrupted, so its commit record cannot be trusted; "
                              f"rebuild this level from its source")
        if not flags & FLAG_COMMITTED or flags & ~_KNOWN_FLAGS:
            raise CtxFormatError(f"{name}: unknown header flags 0x{flags:04X}; it was written by a newer "
                                 f"megacontext, upgrade to read it")
    problem = _layout_problem(level, block_size, dim, dtype_code)
    if problem:
        raise CtxFormatError(f"{name}: bad header: {problem}")
    try:
        model_name = name_raw.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise CtxFormatError(f"{name}: model_name in the header is not valid UTF-8; the header is corrupted") from None
    return _Header(level, block_size, dim, dtype_code, model_name, version, count, crc, gid, flags)


def _pread_all(fd, size, offset):
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _pwrite_all(fd, data, offset):
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_header(fd, name):
    # A reader can race a writer's 18-byte commit write; a mismatching header CRC is
    # retried briefly before it is reported, since a real tear never heals.
    for attempt in range(3):
        try:
            return _parse_header(_pread_all(fd, HEADER_SIZE, 0), name)
        except _TornHeader:
            if attempt == 2:
                raise
            time.sleep(0.01)


def _payload_crc(fd, start, nbytes, crc=0):
    """CRC32 of nbytes at start, streamed through one fixed-size buffer."""
    buf = bytearray(min(_CHUNK_BYTES, max(nbytes, 1)))
    done = 0
    while done < nbytes:
        want = min(len(buf), nbytes - done)
        got = os.preadv(fd, [memoryview(buf)[:want]], start + done)
        if got <= 0:
            break
        crc = zlib.crc32(memoryview(buf)[:got], crc)
        done += got
    return crc


def _bf16_bits_to_float32(bits):
    return (np.asarray(bits, dtype=np.uint32) << np.uint32(16)).view(np.float32)


def _float32_to_bf16_bits(values):
    """Round-to-nearest-even float32 -> bf16 bits (what torch's .to(torch.bfloat16) does).
    The input must be finite; callers check that first."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


class CtxReader:
    """A .ctx file opened for reading: committed entries by index, via a read-only memmap.

    reader[i] is one entry (LOD0: [block_size] uint32 token ids; gists: [embedding_dim]),
    reader[i:j] is [j-i, width]. fp16 gists come back as float16 views of the file; bf16
    gists as float32 arrays (exact: every bf16 is a float32). read_raw() gives the stored
    values (bf16 as uint16 bits) and tensor() a torch tensor in the file's own dtype.
    Payload past the committed count (an interrupted append) is never read."""

    def __init__(self, path, fd, header, verify):
        # the reader owns fd from here on, and closes it if it cannot open the file
        self.path = Path(path)
        self._fd = fd
        self._hdr = header
        self._map = None
        self._mapped_count = -1
        self._verify = verify
        self._verified_count = 0
        self._verified_crc = 0
        try:
            self._check_size(os.fstat(fd).st_size)
            if verify:
                self.verify()
        except BaseException:
            self.close()
            raise

    # --- header and identity ---

    @property
    def header(self):
        """The seed header fields by their names."""
        h = self._hdr
        return {"magic": MAGIC, "version": h.version, "level": h.level, "block_size": h.block_size,
                "embedding_dim": h.embedding_dim, "dtype_code": h.dtype_code, "model_name": h.model_name}

    @property
    def commit_info(self):
        """Our fields in the reserved bytes (all zero / None for a seed-spec file)."""
        h = self._hdr
        return {"committed_count": h.count, "payload_crc32": None if h.seed_spec else h.payload_crc,
                "gistnet_id": h.gistnet_id, "flags": h.flags, "seed_spec": h.seed_spec}

    level = property(lambda self: self._hdr.level)
    block_size = property(lambda self: self._hdr.block_size)
    embedding_dim = property(lambda self: self._hdr.embedding_dim)
    dtype = property(lambda self: DTYPE_NAMES[self._hdr.dtype_code])
    model_name = property(lambda self: self._hdr.model_name)
    gistnet_id = property(lambda self: self._hdr.gistnet_id)
    seed_spec = property(lambda self: self._hdr.seed_spec)
    holds_stale_gists = property(lambda self: bool(self._hdr.flags & FLAG_STALE))  # see FLAG_STALE
    entry_shape = property(lambda self: (self._hdr.entry_width,))
    entry_bytes = property(lambda self: self._hdr.entry_bytes)

    @property
    def tokens_per_entry(self):
        """Tokens of history one entry covers: block_size for LOD0/LOD1, block_size**2 for LOD2."""
        return self._hdr.block_size ** max(self._hdr.level, 1)

    def _name(self):
        return str(self.path)

    def check_identity(self, model_name=None, gistnet=None):
        """Refuse a file made for another base model or by another GistNet (ValueError naming both)."""
        problem = _expectation_problem(self.path, self._hdr, None, model_name, gistnet)
        if problem:
            raise ValueError(problem)

    def is_replaced(self):
        """True when the path now names another file than the one open here (a refresh swapped
        in a new file, or it was removed): this reader still sees the old file's entries."""
        self._check_open()
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino)

    # --- size, integrity ---

    def _committed_end(self):
        return HEADER_SIZE + self._hdr.count * self._hdr.entry_bytes

    def _check_size(self, file_size):
        """Seed-spec files: count = whole entries present. Ours: the committed bytes must exist."""
        h = self._hdr
        if h.seed_spec:
            self._hdr = replace(h, count=(file_size - HEADER_SIZE) // h.entry_bytes)
        elif file_size < self._committed_end():
            have = (file_size - HEADER_SIZE) // h.entry_bytes
            raise CtxFormatError(f"{self._name()} is truncated: its header commits {h.count} entries "
                                 f"but only {have} are on disk; the file was cut after it was written "
                                 f"(partial copy?), restore or rebuild it")
        self.torn_tail_bytes = file_size - self._committed_end()

    def compute_payload_crc32(self):
        """CRC32 of the committed payload as it is on disk now (reads the whole payload)."""
        return _payload_crc(self._fd, HEADER_SIZE, self._committed_end() - HEADER_SIZE)

    def verify(self):
        """Check the committed payload against the header's CRC32; raise CtxFormatError on a
        mismatch. Returns False for a seed-spec file, which has no checksum to check."""
        self._check_open()
        h = self._hdr
        if h.seed_spec:
            return False
        # continue from the prefix already verified, so following a growing file stays cheap
        start = HEADER_SIZE + self._verified_count * h.entry_bytes
        crc = _payload_crc(self._fd, start, self._committed_end() - start, self._verified_crc)
        if crc != h.payload_crc:
            self._verified_count, self._verified_crc = 0, 0
            raise CtxFormatError(f"{self._name()} is corrupted: payload CRC32 0x{crc:08X} does not match "
                                 f"the committed 0x{h.payload_crc:08X} over {h.count} entries; "
                                 f"restore or rebuild this level")
        self._verified_count, self._verified_crc = h.count, crc
        return True

    def refresh(self):
        """Pick up entries committed by a writer since this file was opened; returns len(self)."""
        self._check_open()
        header = _read_header(self._fd, self._name())
        if header.seed_bytes() != self._hdr.seed_bytes():
            raise CtxFormatError(f"{self._name()}: header changed under an open reader (file replaced?); reopen it")
        self._hdr = header
        self._check_size(os.fstat(self._fd).st_size)
        if self._verify:
            self.verify()
        return len(self)

    # --- entries ---

    def __len__(self):
        return self._hdr.count

    def _stored(self):
        """A read-only memory map over exactly the committed entries (remapped when the count grows)."""
        self._check_open()
        count = self._hdr.count
        if self._mapped_count != count:
            shape = (count, self._hdr.entry_width)
            dtype = _STORAGE_DTYPES[self._hdr.dtype_code]
            if count == 0:  # mmap refuses empty ranges
                self._map = np.empty(shape, dtype=dtype)
            else:
                # map through our own descriptor, so a file replaced by path is never read by mistake;
                # views handed out keep the mapping alive after close()
                mapping = mmap.mmap(self._fd, self._committed_end(), access=mmap.ACCESS_READ)
                self._map = np.frombuffer(mapping, dtype=dtype, count=shape[0] * shape[1],
                                          offset=HEADER_SIZE).reshape(shape)
            self._mapped_count = count
        return self._map

    def read_raw(self, index):
        """Entries as stored: uint32 token ids, float16 gists, or bf16 gists as uint16 bits."""
        stored = self._stored()
        if isinstance(index, (int, np.integer)):
            n = len(stored)
            if not -n <= index < n:
                raise IndexError(f"entry {index} out of range: {self._name()} has {n} committed entries")
        return np.asarray(stored[index])

    def __getitem__(self, index):
        raw = self.read_raw(index)
        if self._hdr.dtype_code == DTYPE_BF16:
            return _bf16_bits_to_float32(raw)
        return raw

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def tensor(self, index):
        """Entries as a torch tensor: int64 token ids for LOD0, else the file's float16/bfloat16."""
        import torch
        raw = np.ascontiguousarray(self.read_raw(index))
        if self._hdr.dtype_code == DTYPE_UINT32:
            return torch.from_numpy(raw.astype(np.int64))
        if self._hdr.dtype_code == DTYPE_BF16:
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(raw.copy())

    # --- lifetime ---

    def _check_open(self):
        if self._fd is None:
            raise ValueError(f"{self._name()} is closed")

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        h = self._hdr
        return (f"{type(self).__name__}({str(self.path)!r}, level={h.level}, entries={h.count}, "
                f"block_size={h.block_size}, embedding_dim={h.embedding_dim}, dtype={self.dtype}, "
                f"model_name={h.model_name!r}, gistnet_id=0x{h.gistnet_id:08X})")


class CtxWriter(CtxReader):
    """A .ctx file opened for appending (one writer per file, enforced with a lock).

    append() is one commit: the payload is written past the committed end, flushed,
    then the header's count and checksums are updated in a single 18-byte write. A crash
    at any point leaves the previous commit intact; the uncommitted tail is ignored by
    readers and cut off when the file is next opened for appending.
    durable=False skips the fsyncs: still safe against a killed process (the page cache
    keeps the write order), no longer against power loss."""

    def __init__(self, path, fd, header, verify, durable, lock_fd, adopt_gistnet_id=0):
        # the writer owns lock_fd too: the single-writer flock lives on it, not on fd (see _lock_writer)
        self._lock_fd = lock_fd
        self._durable = durable
        super().__init__(path, fd, header, verify)
        try:
            truncated = self.torn_tail_bytes > 0
            if header.seed_spec:
                # adopt a seed-spec file: checksum its whole entries, then commit them (below)
                crc = self.compute_payload_crc32()
                self._verified_count, self._verified_crc = self._hdr.count, crc
            if truncated:
                os.ftruncate(self._fd, self._committed_end())
                self.torn_tail_bytes = 0
            if header.seed_spec:
                self._write_commit(replace(self._hdr, payload_crc=crc, flags=FLAG_COMMITTED,
                                           gistnet_id=adopt_gistnet_id if self._hdr.level else 0))
            elif truncated and durable:
                _fdatasync(self._fd)
        except BaseException:
            self.close()
            raise
        self.adopted_seed_spec = header.seed_spec

    def _encode(self, entries):
        """Validate entries and convert them to the stored dtype as an [n, width] array.
        Nothing touches the file until this has succeeded."""
        h = self._hdr
        torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
        raw_bf16 = False
        if torch is not None and isinstance(entries, torch.Tensor):
            t = entries.detach().cpu()
            if t.dtype == torch.bfloat16 and h.dtype_code == DTYPE_BF16:
                arr, raw_bf16 = t.contiguous().view(torch.int16).numpy().view(np.uint16), True
            else:
                arr = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        else:
            arr = np.asarray(entries)
        width = h.entry_width
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != width:
            got = tuple(np.shape(entries))
            if h.level == 0:
                raise ValueError(f"{self._name()} stores blocks of block_size={width} token ids; got shape {got}. "
                                 f"Pass one block as [{width}] or n blocks as [n, {width}] (keep a partial block "
                                 f"in memory until it is full)")
            raise ValueError(f"{self._name()} stores gists of embedding_dim={width}; got shape {got}. Pass one "
                             f"gist as [{width}] or n gists as [n, {width}]; a different width means another model")
        if h.level == 0:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"{self._name()}: token ids must be integers, got dtype {arr.dtype}")
            if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
                raise ValueError(f"{self._name()}: token ids must be in 0..2**32-1, got range "
                                 f"[{arr.min()}, {arr.max()}]")
            return np.ascontiguousarray(arr, dtype="<u4")
        if raw_bf16:
            stored = np.ascontiguousarray(arr)
        else:
            if arr.dtype.kind != "f":
                raise ValueError(f"{self._name()}: gists must be floating point, got dtype {arr.dtype} "
                                 f"(token ids belong in LOD0)")
            if not np.isfinite(arr).all():
                raise ValueError(f"{self._name()}: gists contain NaN or inf; refusing to store them")
            if h.dtype_code == DTYPE_FP16:
                with np.errstate(over="ignore"):  # overflow to inf is reported just below
                    stored = np.ascontiguousarray(arr, dtype="<f2")
            else:
                stored = _float32_to_bf16_bits(arr)
        as_float = stored if h.dtype_code == DTYPE_FP16 else _bf16_bits_to_float32(stored)
        if not np.isfinite(as_float).all():
            raise ValueError(f"{self._name()}: gists contain NaN/inf or values beyond the "
                             f"{DTYPE_NAMES[h.dtype_code]} range; refusing to store them")
        return stored

    def append(self, entries):
        """Append and commit entries ([width] for one, [n, width] for n). Returns the new count."""
        self._check_open()
        data = self._encode(entries)
        n = data.shape[0]
        if n == 0:
            return len(self)
        h = self._hdr
        if h.count + n > MAX_ENTRIES:
            raise ValueError(f"{self._name()} would exceed {MAX_ENTRIES} entries (the format's u32 count)")
        end = self._committed_end()
        payload = data.reshape(-1).view(np.uint8)  # little-endian bytes, as laid out on disk
        try:
            _pwrite_all(self._fd, payload, end)
            if self._durable:
                _fdatasync(self._fd)  # the payload must be on disk before the header says so
        except OSError as e:
            try:
                os.ftruncate(self._fd, end)
            except OSError:
                pass  # the uncommitted tail is ignored by readers anyway
            raise RuntimeError(f"{self._name()}: appending {n} entries failed ({e}); "
                               f"the file still holds its {h.count} committed entries") from e
        crc = zlib.crc32(payload, h.payload_crc)
        self._write_commit(replace(h, count=h.count + n, payload_crc=crc))
        if self._verified_count == h.count:  # what we just wrote needs no re-reading
            self._verified_count, self._verified_crc = h.count + n, crc
        return len(self)

    def _write_commit(self, header):
        reserved = header.reserved_bytes()
        # One write of 18 bytes inside the first sector: the commit point.
        if os.pwrite(self._fd, reserved, _SEED_END) != len(reserved):
            raise RuntimeError(f"{self._name()}: short write of the commit record; "
                               f"the previous commit is still the valid state")
        if self._durable:
            _fdatasync(self._fd)
        self._hdr = header

    def close(self):
        try:
            if self._fd is not None:
                _fdatasync(self._fd)  # one flush at the end even when durable=False
        finally:
            try:
                super().close()
            finally:
                _unlock_writer(self._lock_fd)  # last, so the next writer finds a finished file
                self._lock_fd = None


# -----------------------------------------------------------------------------
# opening and creating files

def _open_fd(path, writable):
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the path of a .ctx file (or use open_tree_dir)")
    try:
        return os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; create it with create_ctx(...)") from None


def _expectation_problem(path, header, level=None, model_name=None, gistnet=None):
    """Why this header is not the file the caller expects (naming both sides), or None."""
    if level is not None and level != header.level:
        return f"{path} is a LOD{header.level} file, expected LOD{level}"
    if model_name is not None and model_name != header.model_name:
        return (f"{path} was written for base model {header.model_name!r}, not {model_name!r}; "
                f"rebuild the tree for this model")
    if gistnet is not None and header.level > 0:  # token ids do not depend on a GistNet
        want, have = gistnet_id(gistnet), header.gistnet_id
        if want != have:
            made_by = f"GistNet id 0x{have:08X}" if have else "no recorded GistNet (id 0)"
            named = f"{gistnet!r} (id 0x{want:08X})" if isinstance(gistnet, (str, bytes)) else f"id 0x{want:08X}"
            return (f"{path} holds gists made by {made_by}, not by GistNet {named}; "
                    f"regenerate the gists with this GistNet")
    return None


def open_ctx(path, *, expect_model_name=None, expect_gistnet=None, expect_level=None, verify=True):
    """Open a .ctx file for reading, as its last committed state.

    verify=True checks the payload CRC32 on open (reads the file once, in fixed-size chunks);
    verify=False defers that to reader.verify(). expect_* refuse a file made for another base
    model, by another GistNet (name or id, see gistnet_id), or of another level, with a
    ValueError naming both."""
    fd = _open_fd(path, writable=False)
    try:
        header = _read_header(fd, str(path))
        problem = _expectation_problem(path, header, expect_level, expect_model_name, expect_gistnet)
        if problem:
            raise ValueError(problem)
    except BaseException:
        os.close(fd)
        raise
    return CtxReader(path, fd, header, verify)


def _lock_writer(path, fd):
    """Take the single-writer lock for the file behind fd; returns the descriptor holding it.

    The flock sits on a second descriptor opened only for locking, never on fd itself:
    mmap duplicates fd, and a flock belongs to the open file, so it would otherwise stay
    held for as long as any numpy view of the writer's map is alive after close(). flock
    locks of two opens conflict even within one process, so a second writer is refused
    wherever it comes from."""
    lock_fd = os.open(path, os.O_RDWR)  # writable: flock over NFS needs it for LOCK_EX
    try:
        same = os.fstat(fd), os.fstat(lock_fd)
        if same[0].st_dev != same[1].st_dev or same[0].st_ino != same[1].st_ino:
            raise RuntimeError(f"{path} was replaced while it was being opened for appending; open it again")
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{path} is already open for appending by another writer; "
                               f"close it first (a .ctx file has one writer at a time)") from None
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd


def _unlock_writer(lock_fd):
    if lock_fd is None:
        return
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)  # explicit: a forked child may share this open file
    finally:
        os.close(lock_fd)


def _open_writer(path, check, verify, durable, adopt_gistnet_id=0):
    """Lock the file, read its header, let check(header) refuse it, and only then hand it to
    a writer (which may drop a torn tail or adopt a seed-spec file)."""
    fd = _open_fd(path, writable=True)
    lock_fd = None
    try:
        lock_fd = _lock_writer(path, fd)
        header = _read_header(fd, str(path))
        problem = check(header)
        if problem:
            raise ValueError(problem)
    except BaseException:
        os.close(fd)
        _unlock_writer(lock_fd)
        raise
    return CtxWriter(path, fd, header, verify, durable, lock_fd, adopt_gistnet_id)


def open_ctx_for_append(path, *, expect_model_name=None, expect_gistnet=None, expect_level=None,
                        verify=True, durable=True):
    """Open an existing .ctx file to append more entries. An uncommitted tail left by a crash
    is cut off first. A seed-spec file (zeroed reserved bytes) is adopted: its whole entries
    are checksummed and committed in the reserved bytes, a partial last entry is dropped."""
    check = lambda header: _expectation_problem(path, header, expect_level, expect_model_name, expect_gistnet)
    return _open_writer(path, check, verify, durable)


def _show(field, value):
    if field == "dtype_code":
        return DTYPE_NAMES.get(value, value)
    if field == "gistnet_id":
        return f"0x{value:08X}"
    return repr(value)


def create_ctx(path, *, level, block_size=32, embedding_dim=0, dtype=None, model_name, gistnet=None,
               exist_ok=False, durable=True, verify=True, stale=False):
    """Create a .ctx file and return a writer (a context manager) to append to it.

    level 0 stores token ids (dtype uint32; embedding_dim may be 0 or the model's width);
    levels 1 and 2 store gists of embedding_dim in 'fp16' (default) or 'bf16', made by the
    GistNet named by `gistnet` (a name or weights fingerprint; see gistnet_id). block_size
    is the tree's branching factor, the same in all three files. stale=True sets FLAG_STALE
    (a gist file that also holds an earlier GistNet's gists). With exist_ok=True an
    existing file with this same header is reopened for appending instead; a file with any
    other header is refused and left as it was."""
    code = _dtype_code(dtype, level)
    problem = _layout_problem(level, block_size, embedding_dim, code)
    if problem:
        raise ValueError(f"cannot create {path}: {problem}")
    _encode_model_name(model_name)
    gid = gistnet_id(gistnet)
    if level == 0 and gid:
        raise ValueError(f"cannot create {path}: LOD0 holds token ids and has no GistNet; pass gistnet=None")
    if level == 0 and stale:
        raise ValueError(f"cannot create {path}: LOD0 holds token ids, which are never stale; pass stale=False")
    flags = FLAG_COMMITTED | (FLAG_STALE if stale else 0)
    want = _Header(level, block_size, embedding_dim, code, model_name, gistnet_id=gid, flags=flags)
    path = Path(path)
    if not path.exists() and _link_new_file(path, want):
        return open_ctx_for_append(path, verify=verify, durable=durable)
    if not exist_ok:
        raise FileExistsError(f"{path} already exists; pass exist_ok=True to append to it, "
                              f"or remove it to start over")

    def check(have):
        for field in ("level", "block_size", "embedding_dim", "dtype_code", "model_name", "gistnet_id"):
            if field == "gistnet_id" and have.seed_spec:
                continue  # a seed-spec file records no GistNet; it is adopted with ours
            if getattr(have, field) != getattr(want, field):
                return (f"{path} exists with {field}={_show(field, getattr(have, field))}, but "
                        f"{_show(field, getattr(want, field))} was requested; refusing to append to it "
                        f"(remove it to start over)")
        return None
    return _open_writer(path, check, verify, durable, adopt_gistnet_id=gid)


def _link_new_file(path, header):
    """Write a fresh header beside path and link it into place; False if path appeared meanwhile.
    The path never shows a half-written header, and link (unlike rename) never replaces a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.seed_bytes() + header.reserved_bytes())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# the three levels of a tree directory

def check_tree(readers):
    """Cross-level checks for [LOD0, LOD1, LOD2]: one base model and block size, one gist width,
    dtype and GistNet, and counts that a tree committing LOD0 before LOD1 before LOD2 can have.
    Raises CtxFormatError naming the disagreement."""
    lod0, lod1, lod2 = readers
    for r, level in zip(readers, range(3)):
        if r.level != level:
            raise CtxFormatError(f"{r.path} holds level {r.level} but is named as LOD{level}")
    for r in (lod1, lod2):
        for field in ("model_name", "block_size"):
            if getattr(r, field) != getattr(lod0, field):
                raise CtxFormatError(f"{r.path} has {field}={getattr(r, field)!r} but {lod0.path} has "
                                     f"{getattr(lod0, field)!r}; the levels come from different trees")
    if lod0.embedding_dim and lod0.embedding_dim != lod1.embedding_dim:
        raise CtxFormatError(f"{lod0.path} names embedding_dim={lod0.embedding_dim} but {lod1.path} holds "
                             f"gists of {lod1.embedding_dim}; the levels come from different models")
    for field in ("embedding_dim", "dtype", "gistnet_id"):
        if getattr(lod1, field) != getattr(lod2, field):
            raise CtxFormatError(f"{lod2.path} has {field}={getattr(lod2, field)!r} but {lod1.path} has "
                                 f"{getattr(lod1, field)!r}; both gist levels must come from one GistNet")
    if len(lod1) > len(lod0):
        raise CtxFormatError(f"{lod1.path} has {len(lod1)} gists but {lod0.path} only {len(lod0)} blocks")
    if len(lod2) > len(lod1) // lod0.block_size:
        raise CtxFormatError(f"{lod2.path} has {len(lod2)} gists but {lod1.path} only covers "
                             f"{len(lod1) // lod0.block_size} full groups of {lod0.block_size}")


def open_tree_dir(directory, *, expect_model_name=None, expect_gistnet=None, verify=True):
    """Open DIR/LOD0.ctx, LOD1.ctx and LOD2.ctx for reading; returns [lod0, lod1, lod2] readers."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tree directory {directory} does not exist")
    missing = [name for name in LEVEL_FILENAMES if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"tree directory {directory} is missing {', '.join(missing)}")
    readers = []
    try:
        for level, name in enumerate(LEVEL_FILENAMES):
            readers.append(open_ctx(directory / name, expect_model_name=expect_model_name,
                                    expect_gistnet=expect_gistnet, expect_level=level, verify=verify))
        check_tree(readers)
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


def create_tree_dir(directory, *, block_size=32, embedding_dim, dtype="fp16", model_name, gistnet,
                    exist_ok=False, durable=True):
    """Create (or with exist_ok, reopen) the three level files of a tree; returns [lod0, lod1, lod2]
    writers. LOD0 records embedding_dim too, so the whole tree names the model's width."""
    writers = []
    try:
        for level, name in enumerate(LEVEL_FILENAMES):
            writers.append(create_ctx(Path(directory) / name, level=level, block_size=block_size,
                                      embedding_dim=embedding_dim, dtype=None if level == 0 else dtype,
                                      model_name=model_name, gistnet=None if level == 0 else gistnet,
                                      exist_ok=exist_ok, durable=durable))
        check_tree(writers)
    except BaseException:
        for w in writers:
            w.close()
        raise
    return writers
