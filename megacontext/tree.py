"""
The MegaContext Tree: the whole history of a document at three levels of detail, on disk.

A tree is a directory holding LOD0.ctx (token ids in blocks of B = 32), LOD1.ctx (one gist
per block) and LOD2.ctx (one gist per B LOD1 gists, i.e. per B*B = 1024 tokens), written
through megacontext/storage.py, plus a small tree.json (see below). Everything is read
through memory maps, so RAM stays flat however long the document grows.

Usage:
    tree = MegaContextTree.create("tree", model_name="d20", embedding_dim=1280, gistnet_name=gistnet.identity(),
                                  embed_fn=embed_fn, gist_fn=gistnet)
    tree.ingest(token_ids)                     # any number of tokens, as many calls as you like
    tree.tokens(0, 100), tree.gists(1, 0, 8)   # token ids / gists (n, D) read from disk
    tree.node_at(2, 5000)                      # the LOD2 node covering token 5000
    tree = MegaContextTree.open("tree", expect_model_name="d20", expect_gistnet=name, embed_fn=..., gist_fn=...)
    tree.is_stale(new_gistnet.identity()); tree.refresh(new_gistnet, new_gistnet.identity())

The gister is given as two functions (so this module never imports a model):
    embed_fn(token_ids (n, L) int64 tensor) -> (n, L, D)   the base model's token embeddings
    gist_fn(x (n, B, D), level) -> (n, D)                  level 1: x are token embeddings,
                                                           level 2: x are LOD1 gists
A GistNet module with megacontext.gistnet.token_embeddings fits this; tests use a mean pool.
gistnet_name names the gister (GistNet.identity()); storage records its id in the gist files.

Nodes are never stored: a node is (level, index) and everything else follows from it.
LOD0 block i and LOD1 gist i cover tokens [i*B, (i+1)*B) (the gist is a summary of that
very block: its "children" are the block's tokens); LOD2 gist j covers LOD1 gists
[j*B, (j+1)*B), i.e. tokens [j*B*B, (j+1)*B*B).

The pending tail. LOD0.ctx stores whole blocks only, so the last < B tokens wait in memory
until their block is full. They are also written to tree.json (temp file + rename) at the
end of every ingest() call, together with the LOD0 block count they follow, so reopening
the tree gives them back. Commit order within a call: LOD0 blocks, then their LOD1 gists,
then LOD2 gists, then tree.json. After a crash, reopening gives the state of the last
completed call, or (if the crash hit inside a call) the committed whole blocks of the
interrupted call with its pending tail dropped: `tree.num_tokens` then says how many tokens
of the stream are safely stored, and the caller feeds the rest again from there. Gists
missing after a crash are regenerated when the tree is next opened with a gister.

Sources. tree.json also lists where the stream came from (begin_source / end_source): per
source the caller's identity (megacontext.ingest records path, size and SHA-256), the token
position it starts at and, once whole, its length. A source is recorded before its first
token and marked whole after its last, so after a crash the last record says how much of
which input is committed, and the caller resumes exactly there (ingest is idempotent).

Refreshing after the GistNet changed rewrites LOD1/LOD2 into new files beside the old ones
and swaps them in through a small journal (refresh.json): a crash before the journal is
written leaves the old tree, a crash after it is rolled forward on the next writable open.
A refresh of only a block range under a new GistNet records the blocks still gisted by the
old one ("stale blocks", in tree.json), so `is_stale()` stays true until they are redone.
The gist files themselves carry a STALE flag while any stale block remains (storage.FLAG_STALE),
so a tree.json that was lost, deleted or replaced by an older copy can never make a mixed tree
pass as one GistNet's: a flagged tree without a matching stale record counts every gist it
held as stale. A read-only open with expect_gistnet refuses a tree with stale blocks (its
reader wants that GistNet's gists only); a writable one accepts it, so the refresh can finish.

Following a writer. A read-only tree reads a consistent snapshot: the state of its last
open() or reload(). reload() picks up the writer's appends, and when the writer's refresh has
swapped in new LOD1/LOD2 files (the paths name other files than the ones held open), reopens
them with the checks of the original open() and bumps `generation`. A new GistNet that
expect_gistnet does not allow, stale blocks it does not allow, or a replaced LOD0 (another
tree) is refused with an error that also closes the tree, rather than leave it serving the old
files; a refresh still being swapped in raises RefreshInProgress and keeps the snapshot.

This module decides what goes into the tree and when. It never tokenizes text, never loads
checkpoints and never defines the byte layout (storage.py does).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megacontext.storage import (LEVEL_FILENAMES, CtxFormatError, check_tree, create_ctx, create_tree_dir,
                                 gistnet_id, open_ctx, open_ctx_for_append, open_tree_dir, _fsync_dir)

META_FILENAME = "tree.json"
JOURNAL_FILENAME = "refresh.json"
META_FORMAT = "megacontext-tree"
META_VERSION = 1
DEFAULT_BATCH_BLOCKS = 256  # blocks gisted per GistNet call: big enough to keep a GPU busy, small in RAM

# -----------------------------------------------------------------------------
# Nodes: everything about (level, index) follows from the index

BLOCK_SIZE = 32  # tokens per LOD0 block and LOD1 gists per LOD2 gist; the one definition (import it)


def tokens_per_node(level, block_size=BLOCK_SIZE):
    """Tokens one node of this level covers: B for LOD0 blocks and LOD1 gists, B*B for LOD2."""
    return block_size ** max(level, 1)


def node_span(level, index, block_size=BLOCK_SIZE):
    """(start, end) token span of node (level, index), before clipping to the history length."""
    n = tokens_per_node(level, block_size)
    return index * n, (index + 1) * n


def node_index_at(level, position, block_size=BLOCK_SIZE):
    """Index of the node at this level whose span holds token `position`."""
    if position < 0:
        raise IndexError(f"token position must be >= 0, got {position}")
    return position // tokens_per_node(level, block_size)


def node_parent(level, index, block_size=BLOCK_SIZE):
    """The node one level coarser that summarizes this one: LOD0 block i -> LOD1 gist i,
    LOD1 gist i -> LOD2 gist i // B. LOD2 is the root level (None)."""
    if level == 0:
        return (1, index)
    if level == 1:
        return (2, index // block_size)
    return None


def node_children(level, index, block_size=BLOCK_SIZE):
    """The nodes one level finer that a node summarizes: LOD2 gist j -> the B LOD1 gists
    [j*B, (j+1)*B); LOD1 gist i -> LOD0 block i (its B tokens); LOD0 block -> () (tokens)."""
    if level == 2:
        return [(1, index * block_size + k) for k in range(block_size)]
    if level == 1:
        return [(0, index)]
    return []


def span_id(level, index):
    """One integer naming a node across all levels (level in the top bits, index below)."""
    return (level << 48) | index


@dataclass(frozen=True)
class Node:
    """A node of a particular tree: (level, index) and its token span, clipped to the history
    (only the partial last LOD0 block is ever clipped)."""
    level: int
    index: int
    start: int
    end: int
    block_size: int = 32

    @property
    def span_id(self):
        return span_id(self.level, self.index)

    @property
    def parent(self):
        return node_parent(self.level, self.index, self.block_size)

    @property
    def children(self):
        return node_children(self.level, self.index, self.block_size)


# -----------------------------------------------------------------------------
# small helpers


def _as_token_array(token_ids):
    """token ids (list, numpy array or tensor, 1-D) -> a 1-D int64 numpy array, without a copy
    when it already is one. Ids must fit LOD0's uint32."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"ingest takes a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > 0xFFFFFFFF:
        raise ValueError(f"token ids must be in 0..2**32-1, got range [{lo}, {hi}]")
    return arr.astype(np.int64, copy=False)


def _write_json_atomically(path, obj, durable):
    """Replace path with obj as JSON so that readers see either the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _subtract_range(ranges, a, b):
    """Block ranges [[x, y), ...] with [a, b) taken out."""
    out = []
    for x, y in ranges:
        if y <= a or x >= b:
            out.append([x, y])
            continue
        if x < a:
            out.append([x, a])
        if y > b:
            out.append([b, y])
    return out


def _runs(cuts, n):
    """Consecutive [x, y) pieces of [0, n) split at the given cut points."""
    points = sorted(c for c in cuts if 0 <= c <= n)
    return [(x, y) for x, y in zip(points, points[1:]) if x < y]


def _merge_ranges(ranges):
    out = []
    for x, y in sorted(ranges):
        if y <= x:
            continue
        if out and x <= out[-1][1]:
            out[-1][1] = max(out[-1][1], y)
        else:
            out.append([x, y])
    return out


def _check_arguments(embed_fn, gist_fn, batch_blocks):
    if gist_fn is not None and embed_fn is None:
        raise ValueError("gist_fn needs embed_fn too: gists are computed from the base model's token embeddings")
    if not isinstance(batch_blocks, int) or batch_blocks < 1:
        raise ValueError(f"batch_blocks must be a positive integer, got {batch_blocks!r}")


def _check_gists(gists, n, dim, level):
    """A gister's output must be n finite vectors of the tree's width."""
    if not isinstance(gists, torch.Tensor):
        raise TypeError(f"gist_fn must return a tensor, got {type(gists).__name__}")
    if tuple(gists.shape) != (n, dim):
        raise ValueError(f"gist_fn returned shape {tuple(gists.shape)} for {n} LOD{level} inputs; "
                         f"expected ({n}, {dim}) (one gist of the tree's embedding_dim per input)")
    return gists.detach().float().cpu()


# -----------------------------------------------------------------------------
# The tree


class MegaContextTree:
    """One document's history on disk at LOD0/LOD1/LOD2. Build one with create() or open()."""

    def __init__(self, directory, files, meta, *, writable, embed_fn, gist_fn, gistnet_name,
                 durable, batch_blocks, device):
        # not for direct use: create() and open() check and recover the directory first
        self.directory = Path(directory)
        self._files = files  # [LOD0, LOD1, LOD2]: writers (readers when read-only)
        self.writable = writable
        self.durable = durable
        self.batch_blocks = int(batch_blocks)
        self.device = torch.device(device)
        self._embed_fn = embed_fn
        self._gist_fn = gist_fn
        lod0 = files[0]
        self.block_size = lod0.block_size
        self.embedding_dim = files[1].embedding_dim
        self.model_name = lod0.model_name
        self.dtype = files[1].dtype
        self.gistnet_name = gistnet_name if gistnet_name is not None else meta.get("gistnet_name")
        self.generation = 0  # bumped by refresh() and by reload() reopening refreshed files
        self._expect = {}  # open()'s identity checks, applied again when reload() reopens gist files
        self._load_meta(meta)

    # --- opening and creating ---

    @classmethod
    def create(cls, directory, model_name, embedding_dim, gistnet_name, *, embed_fn=None, gist_fn=None,
               dtype="fp16", block_size=32, durable=True, batch_blocks=DEFAULT_BATCH_BLOCKS, device="cpu"):
        """Make a new, empty tree in `directory` (created if needed). Refuses a directory that
        already holds tree files, leaving them untouched."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory; choose another tree path")
        existing = [n for n in (*LEVEL_FILENAMES, META_FILENAME) if (directory / n).exists()]
        if existing:
            raise FileExistsError(f"{directory} already holds a MegaContext tree ({', '.join(existing)}); "
                                  f"open it with MegaContextTree.open() or choose another directory")
        if not gistnet_name:
            raise ValueError("gistnet_name must name the gister (e.g. GistNet.identity(), or 'mean')")
        _check_arguments(embed_fn, gist_fn, batch_blocks)
        # checked here, since storage would only refuse them after LOD0.ctx exists
        if not isinstance(embedding_dim, int) or not 0 < embedding_dim <= 0xFFFF:
            raise ValueError(f"embedding_dim must be the base model's width (1..65535), got {embedding_dim!r}")
        if dtype not in ("fp16", "bf16", "float16", "bfloat16"):
            raise ValueError(f"gist dtype must be 'fp16' or 'bf16', got {dtype!r}")
        files = create_tree_dir(directory, block_size=block_size, embedding_dim=embedding_dim, dtype=dtype,
                                model_name=model_name, gistnet=gistnet_name, durable=durable)
        meta = {"gistnet_name": gistnet_name, "lod0_blocks": 0, "tail": [], "stale_lod1_blocks": [], "sources": []}
        tree = cls(directory, files, meta, writable=True, embed_fn=embed_fn, gist_fn=gist_fn,
                   gistnet_name=gistnet_name, durable=durable, batch_blocks=batch_blocks, device=device)
        tree._save_meta()
        return tree

    @classmethod
    def open(cls, directory, *, expect_model_name=None, expect_gistnet=None, embed_fn=None, gist_fn=None,
             readonly=False, verify=True, durable=True, batch_blocks=DEFAULT_BATCH_BLOCKS, device="cpu"):
        """Open an existing tree.

        expect_model_name / expect_gistnet refuse a tree made for another base model or by
        another GistNet (ValueError naming both). To ingest, pass embed_fn and gist_fn, and
        expect_gistnet naming that gister, so new gists never mix with another GistNet's. To
        switch GistNets, open without expect_gistnet and call refresh(). A writable open
        finishes an interrupted refresh and regenerates gists a crash left missing (when a
        gister is given); readonly=True never writes and may follow a live writer (reload())."""
        directory = Path(directory)
        if gist_fn is not None and expect_gistnet is None:
            raise ValueError("pass expect_gistnet= naming the GistNet of gist_fn, so the tree can check that "
                             "its gists were made by the same one")
        _check_arguments(embed_fn, gist_fn, batch_blocks)
        if not directory.is_dir():
            raise FileNotFoundError(f"tree directory {directory} does not exist; create it with "
                                    f"MegaContextTree.create() (or megacontext.ingest)")
        if readonly:
            _refuse_running_refresh(directory)
            files = open_tree_dir(directory, expect_model_name=expect_model_name,
                                  expect_gistnet=expect_gistnet, verify=verify)
        else:
            files = cls._open_writers(directory, expect_model_name, expect_gistnet, verify, durable)
        try:
            meta = cls._read_meta(directory, files[0])
            tree = cls(directory, files, meta, writable=not readonly, embed_fn=embed_fn, gist_fn=gist_fn,
                       gistnet_name=expect_gistnet if isinstance(expect_gistnet, str) else None,
                       durable=durable, batch_blocks=batch_blocks, device=device)
            tree._expect = dict(expect_model_name=expect_model_name, expect_gistnet=expect_gistnet, verify=verify)
            if readonly:
                tree._check_reader_gistnet()
            if not readonly and gist_fn is not None:
                tree._catch_up()
        except BaseException:
            for f in files:
                f.close()
            raise
        return tree

    @staticmethod
    def _open_writers(directory, expect_model_name, expect_gistnet, verify, durable):
        missing = [n for n in LEVEL_FILENAMES if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(f"tree directory {directory} is missing {', '.join(missing)}; "
                                    f"it is not a MegaContext tree (create one with megacontext.ingest)")
        files = []
        try:
            # LOD0's lock makes us the tree's only writer before anything is repaired
            files.append(open_ctx_for_append(directory / LEVEL_FILENAMES[0], expect_model_name=expect_model_name,
                                             expect_level=0, verify=verify, durable=durable))
            _finish_refresh(directory)
            for level in (1, 2):
                files.append(open_ctx_for_append(directory / LEVEL_FILENAMES[level],
                                                 expect_model_name=expect_model_name, expect_gistnet=expect_gistnet,
                                                 expect_level=level, verify=verify, durable=durable))
            check_tree(files)
        except BaseException:
            for f in files:
                f.close()
            raise
        return files

    def close(self):
        for f in self._files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"MegaContextTree({str(self.directory)!r}, tokens={self.num_tokens}, "
                f"gists=({self.num_gists(1)}, {self.num_gists(2)}), model_name={self.model_name!r}, "
                f"gistnet={self.gistnet_name!r}, dtype={self.dtype})")

    # --- tree.json: the pending tail and the refresh state ---

    @staticmethod
    def _read_meta(directory, lod0):
        path = directory / META_FILENAME
        if not path.exists():  # a crash between creating the level files and writing tree.json
            return {}
        try:
            meta = json.loads(path.read_text())
            if meta.get("format") != META_FORMAT:
                raise ValueError("not a tree.json")
        except (ValueError, OSError) as e:
            raise CtxFormatError(f"{path} is damaged ({e}); it only holds the < {lod0.block_size} pending "
                                 f"tail tokens and the refresh state: delete it to open the tree without them") from None
        if meta.get("version") != META_VERSION:
            raise CtxFormatError(f"{path} is version {meta.get('version')}, this build reads {META_VERSION}")
        if meta.get("block_size") != lod0.block_size or meta.get("model_name") != lod0.model_name:
            raise CtxFormatError(f"{path} belongs to another tree (block_size={meta.get('block_size')}, "
                                 f"model_name={meta.get('model_name')!r}); delete it or restore the right one")
        return meta

    def _load_meta(self, meta):
        B = self.block_size
        tail = np.asarray(meta.get("tail", []), dtype=np.int64)
        if meta.get("lod0_blocks", 0) != len(self._files[0]) or not len(tail) < B:
            # the tail belongs to another LOD0 length: a crash inside ingest(). Its tokens either went
            # into the blocks that were committed after it, or were never stored; drop it.
            tail = np.zeros(0, dtype=np.int64)
        self._tail = tail
        self._stale = _merge_ranges([list(r) for r in meta.get("stale_lod1_blocks", [])])
        recorded = meta.get("gistnet_name")
        if isinstance(recorded, str) and gistnet_id(recorded) != self.gistnet_id:
            self._stale = []  # tree.json describes other gist files (an older copy): its record is void
            if self.gistnet_name == recorded:
                self.gistnet_name = None
        if not self._stale and any(f.holds_stale_gists for f in self._files[1:]):
            # the files say some gists are an earlier GistNet's but the record of which is gone
            self._stale = [[0, len(self._files[1])]] if len(self._files[1]) else []
        self._sources = [dict(s) for s in meta.get("sources", [])]

    def _meta(self):
        return {"format": META_FORMAT, "version": META_VERSION, "block_size": self.block_size,
                "model_name": self.model_name, "gistnet_name": self.gistnet_name,
                "lod0_blocks": len(self._files[0]), "tail": [int(t) for t in self._tail],
                "stale_lod1_blocks": self._stale, "sources": self._sources}

    def _save_meta(self):
        _write_json_atomically(self.directory / META_FILENAME, self._meta(), self.durable)

    def reload(self):
        """Read-only trees: pick up what a writer in another process has committed since, and
        reopen the gist files if the writer's refresh swapped in new ones (see the module
        docstring). Returns num_tokens. While a refresh is being swapped in it raises
        RefreshInProgress and keeps its snapshot (call it again later); other refusals close the tree."""
        try:
            _refuse_running_refresh(self.directory)
            if self._files[0].is_replaced():
                raise RuntimeError(f"{self._files[0].path} is another file than the one this tree opened (the "
                                   f"tree was replaced); open it again")
            swapped = any(f.is_replaced() for f in self._files[1:])
            if swapped:
                try:
                    self._reopen_gist_files()
                except ValueError as e:  # CtxFormatError included: same type, with what happened
                    raise type(e)(f"the writer swapped in refreshed gists that this reader refuses: {e}") from None
            # newest level first: the writer commits LOD0, then LOD1, then LOD2, so reading in the
            # reverse order never sees a gist whose block or LOD1 gists it has not seen
            for f in reversed(self._files):
                f.refresh()
            meta = self._read_meta(self.directory, self._files[0])
            if swapped:
                expect = self._expect.get("expect_gistnet")
                self.gistnet_name = expect if isinstance(expect, str) else meta.get("gistnet_name")
            self._load_meta(meta)
            self._check_reader_gistnet()
        except RefreshInProgress:
            raise  # nothing was swapped in yet: the snapshot stands
        except BaseException:
            self.close()
            raise
        return self.num_tokens

    def _reopen_gist_files(self):
        """Open the LOD1/LOD2 files the paths name now, with the checks of open(), in place of the old ones."""
        new = []
        try:
            for level in (2, 1):  # newest level first (see reload)
                new.insert(0, open_ctx(self.directory / LEVEL_FILENAMES[level], expect_level=level, **self._expect))
            check_tree([self._files[0]] + new)
            _refuse_running_refresh(self.directory)  # a new refresh may have begun while we opened them
        except BaseException:
            for f in new:
                f.close()
            raise
        for f in self._files[1:]:
            f.close()
        self._files[1:] = new
        self.dtype = new[0].dtype
        self.generation += 1

    def _check_reader_gistnet(self):
        """A reader that named a GistNet reads only its gists: refuse stale blocks of another one."""
        expect = self._expect.get("expect_gistnet")
        if expect is not None and self._stale:
            raise ValueError(f"{self.directory} still holds gists of an earlier GistNet in LOD1 blocks {self._stale} "
                             f"(a refresh of a block range), so not all of them were made by GistNet {expect!r}; "
                             f"refresh those blocks first, or open without expect_gistnet to read them anyway")

    # --- sources: which inputs the token stream came from, and how far each is committed ---

    @property
    def sources(self):
        """The recorded sources, in stream order: dicts with the caller's identity fields plus
        "start" (the token position the source begins at) and "tokens" (its length once whole,
        None while it is being ingested). The committed part of the last, unfinished source is
        num_tokens - start: after a crash, a caller resumes it by skipping that many tokens."""
        return [dict(s) for s in self._sources]

    def begin_source(self, identity):
        """Record that the tokens from here on come from `identity` (a JSON-able dict), before any
        of them is ingested, so a crash at any later point still says where the source began."""
        if not self.writable:
            raise RuntimeError(f"cannot record a source: the tree at {self.directory} was opened read-only")
        if self._sources and self._sources[-1]["tokens"] is None:
            raise ValueError(f"the tree is still ingesting {self._sources[-1]}; finish it first")
        self._sources.append(dict(identity, start=self.num_tokens, tokens=None))
        self._save_meta()

    def end_source(self, **fields):
        """Mark the last source ended (its tokens are all ingested), recording any extra JSON-able
        fields with it (e.g. interrupted=True for one a caller closes short after a crash)."""
        if not self._sources or self._sources[-1]["tokens"] is not None:
            raise ValueError("no source is being ingested")
        self._sources[-1].update(fields)
        self._sources[-1]["tokens"] = self.num_tokens - self._sources[-1]["start"]
        self._save_meta()

    # --- sizes ---

    @property
    def num_blocks(self):
        """Whole LOD0 blocks committed to disk."""
        return len(self._files[0])

    @property
    def pending_tokens(self):
        """Tokens of the partial last block (< block_size), kept in memory and in tree.json."""
        return len(self._tail)

    @property
    def num_tokens(self):
        return len(self._files[0]) * self.block_size + len(self._tail)

    def __len__(self):
        return self.num_tokens

    def num_gists(self, level):
        """Committed gists at level 1 or 2."""
        if level not in (1, 2):
            raise ValueError(f"gist levels are 1 and 2, got {level}")
        return len(self._files[level])

    def num_nodes(self, level):
        """Nodes at a level: LOD0 counts the partial last block too."""
        if level == 0:
            return -(-self.num_tokens // self.block_size)
        return self.num_gists(level)

    @property
    def missing_gists(self):
        """(LOD1, LOD2) gists that the committed blocks call for but a crash left unwritten."""
        n0, n1, n2 = (len(f) for f in self._files)
        return n0 - n1, n1 // self.block_size - n2

    # --- lookups ---

    def tokens(self, start=0, end=None):
        """Token ids [start, end) as an int64 numpy array (committed blocks and pending tail)."""
        n = self.num_tokens
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise IndexError(f"token range [{start}, {end}) is outside the tree's {n} tokens")
        B = self.block_size
        committed = len(self._files[0]) * B
        out = np.empty(end - start, dtype=np.int64)
        if start < committed:
            b0, b1 = start // B, -(-min(end, committed) // B)
            blocks = self._files[0][b0:b1].reshape(-1)
            lo = start - b0 * B
            out[:min(end, committed) - start] = blocks[lo:lo + min(end, committed) - start]
        if end > committed:
            out[max(start, committed) - start:] = self._tail[max(start, committed) - committed:end - committed]
        return out

    def gists(self, level, start=0, end=None):
        """Gists [start, end) of level 1 or 2 as an (n, D) numpy array of the tree's values:
        float16 for fp16 trees, float32 for bf16 trees (exact). A copy, not a view of the file
        (a live view would keep the file's memory map, and with it the writer's lock, open)."""
        f = self._files[level] if level in (1, 2) else None
        if f is None:
            raise ValueError(f"gist levels are 1 and 2, got {level}")
        n = len(f)
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise IndexError(f"LOD{level} range [{start}, {end}) is outside the {n} gists in the tree")
        return np.array(f[start:end])

    def node(self, level, index):
        """Node (level, index) with its token span; IndexError if the tree has no such node."""
        if level not in (0, 1, 2):
            raise ValueError(f"levels are 0, 1 and 2, got {level}")
        if not 0 <= index < self.num_nodes(level):
            raise IndexError(f"LOD{level} node {index} does not exist: the tree has {self.num_nodes(level)}")
        start, end = node_span(level, index, self.block_size)
        return Node(level, index, start, min(end, self.num_tokens), self.block_size)

    def node_at(self, level, position):
        """The node of this level that covers token `position` (IndexError if none exists yet,
        e.g. a LOD2 gist for the last, incomplete 1024 tokens)."""
        if not 0 <= position < self.num_tokens:
            raise IndexError(f"token {position} is outside the tree's {self.num_tokens} tokens")
        return self.node(level, node_index_at(level, position, self.block_size))

    # --- ingest ---

    def _require_gister(self, what):
        if not self.writable:
            raise RuntimeError(f"cannot {what}: the tree at {self.directory} was opened read-only")
        if self._gist_fn is None or self._embed_fn is None:
            raise RuntimeError(f"cannot {what}: the tree was opened without a gister; pass embed_fn, gist_fn "
                               f"and expect_gistnet to MegaContextTree.open()/create()")

    def ingest(self, token_ids):
        """Append token ids (1-D list/array/tensor, any length). Whole blocks go to LOD0 and get
        their LOD1 gist; every B new LOD1 gists get a LOD2 gist; the partial last block stays
        pending (in memory and tree.json). Returns the tree's token count."""
        self._require_gister("ingest")
        ids = _as_token_array(token_ids)
        if ids.size == 0:
            return self.num_tokens
        self._catch_up()
        B = self.block_size
        step = self.batch_blocks * B  # tokens taken per round: RAM is bounded by this, not by len(ids)
        tail, pos = self._tail, 0
        while pos < ids.size:
            take = step - tail.size
            chunk = np.concatenate([tail, ids[pos:pos + take]])
            pos += take
            n_full = chunk.size // B
            if n_full:
                self._files[0].append(chunk[:n_full * B].reshape(n_full, B))
                # until tree.json is rewritten, a crash drops the tail: its tokens are in LOD0 now
                self._tail = np.zeros(0, dtype=np.int64)
                self._catch_up()
            tail = chunk[n_full * B:]
        self._tail = tail.copy()  # own it, never a view of the caller's array
        self._save_meta()
        return self.num_tokens

    def _catch_up(self):
        """Gist every committed block (and group of B gists) that has no gist yet."""
        if self._gist_fn is None:
            return
        lod0, lod1, lod2 = self._files
        if len(lod1) < len(lod0):
            self._gist_blocks(len(lod1), len(lod0), lod1, self._gist_fn)
        if len(lod2) < len(lod1) // self.block_size:
            self._gist_groups(len(lod2), len(lod1) // self.block_size, lod1, lod2, self._gist_fn)

    @torch.no_grad()
    def _gist_blocks(self, first, last, out, gist_fn, embed_fn=None):
        """LOD1 gists of blocks [first, last), appended to `out`, batch_blocks at a time."""
        embed_fn = embed_fn or self._embed_fn
        lod0 = self._files[0]
        for a in range(first, last, self.batch_blocks):
            b = min(a + self.batch_blocks, last)
            ids = torch.from_numpy(lod0[a:b].astype(np.int64)).to(self.device)
            out.append(_check_gists(gist_fn(embed_fn(ids), 1), b - a, self.embedding_dim, 1))

    @torch.no_grad()
    def _gist_groups(self, first, last, lod1, out, gist_fn):
        """LOD2 gists of groups [first, last), from the committed LOD1 gists in `lod1`."""
        B, D = self.block_size, self.embedding_dim
        per_batch = max(1, self.batch_blocks // B)
        for a in range(first, last, per_batch):
            b = min(a + per_batch, last)
            x = np.asarray(lod1[a * B:b * B], dtype=np.float32).reshape(b - a, B, D)
            x = torch.from_numpy(x).to(self.device)
            out.append(_check_gists(gist_fn(x, 2), b - a, D, 2))

    # --- staleness and refresh ---

    @property
    def gistnet_id(self):
        """The GistNet id stored in the gist files (storage.gistnet_id of its name)."""
        return self._files[1].gistnet_id

    def stale_blocks(self):
        """LOD1 block ranges [[start, end), ...] still gisted by an earlier GistNet after a
        range refresh (LOD2 gists over them are stale too)."""
        return [list(r) for r in self._stale]

    def is_stale(self, current_gistnet_name):
        """True if any gist in the tree was not made by the GistNet named `current_gistnet_name`."""
        return gistnet_id(current_gistnet_name) != self.gistnet_id or bool(self._stale)

    def refresh(self, gist_fn, gistnet_name, start_block=None, end_block=None, embed_fn=None):
        """Recompute gists with `gist_fn` (named `gistnet_name`), e.g. after GistNet weights changed.

        Without a range every LOD1 and LOD2 gist is redone. With [start_block, end_block) only
        those blocks' LOD1 gists and the LOD2 gists over them are redone (plus any gists a crash
        left missing); if gistnet_name is a new GistNet, the rest are then recorded as stale.
        New LOD1/LOD2 files are written beside the old ones and swapped in through a journal,
        so a crash at any point leaves either the old or the new tree. Afterwards the tree
        ingests with this gister."""
        if not self.writable:
            raise RuntimeError(f"cannot refresh: the tree at {self.directory} was opened read-only")
        embed_fn = embed_fn or self._embed_fn
        if embed_fn is None:
            raise ValueError("refresh needs embed_fn (the base model's token embeddings); pass embed_fn=")
        new_id = gistnet_id(gistnet_name)
        B = self.block_size
        lod0, lod1, lod2 = self._files
        n0, old1, old2 = len(lod0), len(lod1), len(lod2)
        a = 0 if start_block is None else int(start_block)
        b = n0 if end_block is None else int(end_block)
        if not 0 <= a <= b <= n0:
            raise ValueError(f"block range [{a}, {b}) is outside the tree's {n0} committed blocks")
        whole = a == 0 and b == n0
        paths = [self.directory / f".{LEVEL_FILENAMES[level]}.refresh" for level in (1, 2)]
        for p in paths:
            p.unlink(missing_ok=True)  # leftovers of a refresh that died before its journal
        if whole:
            stale = []
        elif new_id == self.gistnet_id:
            stale = _subtract_range(self._stale, a, b)
        else:  # everything gisted before, outside [a, b), came from another GistNet
            stale = _subtract_range(_merge_ranges(self._stale + [[0, old1]]), a, b)
        kw = dict(block_size=B, embedding_dim=self.embedding_dim, dtype=self.dtype,
                  model_name=self.model_name, gistnet=new_id, durable=False, stale=bool(stale))
        try:
            with create_ctx(paths[0], level=1, **kw) as new1:
                # LOD1: regist [a, b) and every block without a gist yet, copy the rest as it is
                for x, y in _runs({0, a, b, old1, n0}, n0):
                    if a <= x < b or x >= old1:
                        self._gist_blocks(x, y, new1, gist_fn, embed_fn)
                    else:
                        self._copy(lod1, x, y, new1)
                with create_ctx(paths[1], level=2, **kw) as new2:
                    # LOD2: regist the groups over [a, b) and those without a gist yet
                    n_groups = len(new1) // B
                    ga, gb = (a // B, -(-b // B)) if a < b else (0, 0)
                    for x, y in _runs({0, ga, gb, old2, n_groups}, n_groups):
                        if ga <= x < gb or x >= old2:
                            self._gist_groups(x, y, new1, new2, gist_fn)
                        else:
                            self._copy(lod2, x, y, new2)
            meta = dict(self._meta(), gistnet_name=gistnet_name if isinstance(gistnet_name, str) else None,
                        stale_lod1_blocks=stale)
            journal = {"renames": [[p.name, LEVEL_FILENAMES[level]] for p, level in zip(paths, (1, 2))],
                       "meta": meta}
            # the commit point: once the journal exists, the swap is finished (now or at next open)
            _write_json_atomically(self.directory / JOURNAL_FILENAME, journal, durable=True)
        except BaseException:
            for p in paths:
                p.unlink(missing_ok=True)
            raise
        lod1.close()
        lod2.close()
        _finish_refresh(self.directory)
        for level in (1, 2):
            self._files[level] = open_ctx_for_append(self.directory / LEVEL_FILENAMES[level],
                                                     expect_gistnet=new_id, expect_level=level,
                                                     verify=False, durable=self.durable)
        self._stale = stale
        self._gist_fn = gist_fn
        self._embed_fn = embed_fn
        self.gistnet_name = meta["gistnet_name"]
        self.generation += 1

    def _copy(self, src, first, last, out):
        for a in range(first, last, self.batch_blocks):
            out.append(src[a:min(a + self.batch_blocks, last)])


class RefreshInProgress(RuntimeError):
    """A writer is swapping refreshed gist files in (its journal exists); read-only opens wait."""


def _refuse_running_refresh(directory):
    if (Path(directory) / JOURNAL_FILENAME).exists():
        raise RefreshInProgress(f"{directory} has an unfinished gist refresh ({JOURNAL_FILENAME}); wait for it "
                                f"(a read-only tree keeps its last snapshot until reload() succeeds), or open "
                                f"the tree writable once to complete it")


def _finish_refresh(directory):
    """Complete a refresh whose journal was written (roll forward), or clear the files of one
    that died before it (the old tree stands). Call only while holding the tree's LOD0 lock."""
    directory = Path(directory)
    journal_path = directory / JOURNAL_FILENAME
    if not journal_path.exists():
        for level in (1, 2):
            (directory / f".{LEVEL_FILENAMES[level]}.refresh").unlink(missing_ok=True)
        return
    journal = json.loads(journal_path.read_text())
    for src, dst in journal["renames"]:
        if (directory / src).exists():
            os.replace(directory / src, directory / dst)
    _fsync_dir(directory)
    _write_json_atomically(directory / META_FILENAME, journal["meta"], durable=True)
    journal_path.unlink()
    _fsync_dir(directory)
