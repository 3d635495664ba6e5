"""
Rows of long documents for training, and the data source that hands them to nanochat.train.

A row is `row_tokens` tokens of ONE document, starting with BOS: either a window of a natural
document (BOS + the document from a random offset) or a synthetic case (synthetic.py) whose
question sits at a random length (or at a fixed one, `synthetic_history`) and whose document
goes on after the answer with the case's further queries (needle, assoc) and then natural text. Which kind a row is comes from the mixture weights. Rows never cross documents;
natural documents shorter than a row are skipped (counted in `skipped`).

Targets: a natural row is supervised everywhere. In a synthetic row only the question, the
answer and the further queries are (the filler around them gets the ignore index -1): the
filler is natural text the natural rows already teach, and unmasked it would bury the few
answer tokens (a dozen in a thousand) that only distant context predicts; with the filler
supervised, retrieval did not emerge in 2,000 CPU steps. `synthetic_targets: all` turns the
mask off.

Copy warm-up (`copy_warmup_rows: N`): the first N rows of the train stream are copy rows, a
random sequence of COPY_PERIOD merged tokens repeated to fill the row, supervised everywhere. A d4 model
forms no copy (induction) mechanism from the mixture's few million tokens, so it cannot use the
names and lines that natural code repeats from far back; on these rows it forms one in 700-1,200
steps of 2 rows (docs/benchmarks.md, "Copy warm-up"; configs/longctx_copy_cpu.yaml uses 2,400 rows).
Val and test rows are never copy rows.

Determinism and resume: row i of a stream is a pure function of (seed, split, i): its RNG
is random.Random(f"{seed}:{split}:{i}"). A stream is therefore resumed exactly from the index
of its next row, and rank r of a world of size w takes rows r, r + w, r + 2w, ... (the
ranks together see the single-process stream, interleaved).

Two ways out:
    window_batches(...)   (history (B, L), horizon (B, H), state) for MegaContext training
    example_batches(...)  whole rows with their supervision and row ids (the megacontext
                          variant's own loader); history_horizon() cuts one into an example
    LongDocSource         the `data:` section of a nanochat.train run config, e.g.
                              data: {source: longdocs, mixture: {natural: 0.5, passkey: 0.2}}
                          yielding (x, y, state) like nanochat's own loader, so the vanilla
                          trainer pre-trains on long documents without a second loop.

This module owns row construction, sharding and resume. It never tokenizes the corpus
(longdocs.py) and never defines the tasks (synthetic.py).
"""

import random

import numpy as np
import torch

from megacontext.longdocs import load_corpus, SOURCES
from megacontext.synthetic import TASKS, make_case, filler

KINDS = ("natural",) + TASKS
DEFAULT_MIXTURE = {"natural": 0.5, "passkey": 0.15, "needle": 0.1, "repeat": 0.1, "assoc": 0.1, "vartrack": 0.05}
MIN_SYNTHETIC_HISTORY = 128  # shortest synthetic history in a training row (tokens)
COPY_PERIOD = (16, 300)      # a copy row repeats a random sequence of this many tokens (inclusive range)


def check_mixture(mixture):
    unknown = set(mixture) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown mixture kind(s): {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
    if any(not isinstance(w, (int, float)) or w < 0 for w in mixture.values()) or sum(mixture.values()) <= 0:
        raise ValueError(f"mixture weights must be non-negative numbers with a positive sum, got {mixture}")
    return {k: float(w) for k, w in mixture.items() if w > 0}


def check_copy_warmup_rows(rows):
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"copy_warmup_rows must be a non-negative whole number of rows, got {rows!r}")
    return rows


def natural_document_weights(corpus, source_weights=None):
    """How often each document of `corpus` is drawn for a natural row.

    By default in proportion to its length (every token equally likely). With source_weights
    (source -> share of the natural rows), each source gets that share, split among its
    documents by length. By length, the plays are 54% of the offline train split and code,
    whose names and signatures come back thousands of tokens later, 45%."""
    lengths = corpus.lengths().astype(np.float64)
    if not source_weights:
        return lengths
    unknown = set(source_weights) - set(SOURCES)
    if unknown or any(not isinstance(w, (int, float)) or w < 0 for w in source_weights.values()):
        raise ValueError(f"source_weights must map sources ({', '.join(SOURCES)}) to non-negative numbers, "
                         f"got {source_weights}")
    totals = {}
    for src, n in zip(corpus.sources, lengths):
        totals[src] = totals.get(src, 0.0) + n
    weights = np.array([float(source_weights.get(src, 0.0)) * n / totals[src]
                        for src, n in zip(corpus.sources, lengths)])
    if weights.sum() <= 0:
        raise ValueError(f"source_weights {source_weights} give no weight to any source of this corpus "
                         f"({', '.join(sorted(totals))})")
    return weights


class RowStream:
    """Deterministic stream of long-document rows of one split."""

    def __init__(self, tokenizer, row_tokens, split="train", mixture=None, seed=0, sources=SOURCES, corpus=None,
                 synthetic_targets="answers", synthetic_history=None, source_weights=None, copy_warmup_rows=0):
        if synthetic_targets not in ("answers", "all"):
            raise ValueError(f"synthetic_targets must be 'answers' or 'all', got {synthetic_targets!r}")
        self.synthetic_targets = synthetic_targets
        if row_tokens < 2:
            raise ValueError(f"row_tokens must be at least 2, got {row_tokens}")
        # a fixed history puts every answer at the same position of its row (JT1 scores a fixed horizon)
        if synthetic_history is not None and not MIN_SYNTHETIC_HISTORY <= synthetic_history <= row_tokens - 16:
            raise ValueError(f"synthetic_history must lie in [{MIN_SYNTHETIC_HISTORY}, {row_tokens - 16}] (room for "
                             f"the answer in a {row_tokens}-token row), got {synthetic_history}")
        self.synthetic_history = synthetic_history
        check_copy_warmup_rows(copy_warmup_rows)
        self.copy_warmup_rows = copy_warmup_rows if split == "train" else 0  # val and test rows never change
        self.tokenizer = tokenizer
        self.row_tokens = row_tokens
        self.split = split
        self.seed = seed
        self.mixture = check_mixture(mixture or DEFAULT_MIXTURE)
        corpus = corpus if corpus is not None else load_corpus(tokenizer, split, sources)
        self.filler_corpus = corpus  # synthetic filler may come from any document of the split
        # natural rows need a document of at least row_tokens - 1 tokens (the BOS is the other one)
        self.corpus = corpus.longer_than(row_tokens - 1)
        self.skipped = self.corpus.skipped
        if len(self.corpus) == 0 and self.mixture.get("natural"):
            raise ValueError(f"no {split} document is at least {row_tokens - 1} tokens long, so no natural row "
                             f"fits; lower the row length or set the natural weight to 0")
        self.bos = tokenizer.get_bos_token_id()
        self._kinds = list(self.mixture)
        self._weights = [self.mixture[k] for k in self._kinds]
        self._natural_weights = natural_document_weights(self.corpus, source_weights)

    def kind_of(self, rng):
        return rng.choices(self._kinds, weights=self._weights)[0]

    def row(self, index):
        """(tokens (row_tokens,) int64 numpy, kind) of row `index`."""
        tokens, kind, _ = self.row_with_targets(index)
        return tokens, kind

    def row_with_targets(self, index):
        """(tokens, kind, supervised) of row `index`; supervised[i] says whether token i is a target."""
        n = self.row_tokens
        if index < self.copy_warmup_rows:
            return self.copy_row(random.Random(f"{self.seed}:copy:{index}")), "copy", np.ones(n, dtype=bool)
        rng = random.Random(f"{self.seed}:{self.split}:{index}")
        kind = self.kind_of(rng)
        if kind == "natural":
            d = rng.choices(range(len(self.corpus)), weights=self._natural_weights)[0]
            doc = self.corpus.arrays[d]
            start = rng.randrange(0, len(doc) - (n - 1) + 1)
            tokens = np.concatenate([[self.bos], doc[start:start + n - 1].astype(np.int64)])
            return tokens, kind, np.ones(n, dtype=bool)
        # a synthetic case with a history of random length, the document continuing after it
        longest = n - 16  # leave room for the answer
        history = rng.randrange(min(MIN_SYNTHETIC_HISTORY, longest), longest + 1)
        if self.synthetic_history is not None:  # drawn anyway: the rest of the row's draws stay as they were
            history = self.synthetic_history
        depth = rng.random()
        try:
            case = make_case(kind, rng, self.tokenizer, self.filler_corpus, history, depth)
        except ValueError:  # the task's fixed parts need more room than this draw gave (tiny tokenizers)
            case = make_case(kind, rng, self.tokenizer, self.filler_corpus, longest, depth)
        pieces = [case.tokens]
        queries = list(case.extra.get("more_queries", ()))
        rng.shuffle(queries)
        pieces += [np.asarray(q, dtype=np.int64) for q in queries]  # more retrieval targets, when the task has them
        tokens = np.concatenate(pieces)[:n]
        supervised = np.ones(n, dtype=bool)
        if self.synthetic_targets == "answers":
            supervised[:] = False
            supervised[case.extra["question_start"]:len(tokens)] = True
        if len(tokens) < n:
            tokens = np.concatenate([tokens, filler(rng, self.filler_corpus, n - len(tokens))])
        return tokens, kind, supervised

    def copy_row(self, rng):
        """A random sequence of COPY_PERIOD tokens, repeated after the BOS to fill the row: every
        token after its first period is predictable only by finding its earlier copy."""
        period = rng.randint(*COPY_PERIOD)
        # the merged tokens: above the 256 byte tokens, below the special tokens (they take the last ids)
        high = self.tokenizer.get_vocab_size() - len(self.tokenizer.get_special_tokens())
        sequence = [rng.randrange(256, high) for _ in range(period)]
        repeats = (self.row_tokens - 1) // period + 1
        return np.asarray(([self.bos] + sequence * repeats)[:self.row_tokens], dtype=np.int64)

    def rows(self, start=0, rank=0, world_size=1, with_targets=False):
        """Yield (index, tokens, kind[, supervised]) for index = start, start + world_size, ...
        (start ≡ rank mod world)."""
        if start % world_size != rank:
            start = start + ((rank - start) % world_size)
        index = start
        while True:
            tokens, kind, supervised = self.row_with_targets(index)
            yield (index, tokens, kind, supervised) if with_targets else (index, tokens, kind)
            index += world_size


def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _batches(stream, B, start, device):
    """(batch (B, row_tokens) int64 on device, supervised (B, row_tokens) bool, state, row_ids (B,))
    forever. As nanochat's loader, state["exact"] is the position just before this batch (resuming
    from it yields this batch again: nanochat.train saves the state of the batch its next step
    will train on), while state["pq_idx"] (the meta file's copy) points after it, so a resume
    without the snapshot skips ahead the way upstream's approximate resume does."""
    rank, world = _dist_info()
    rows = stream.rows(start, rank, world, with_targets=True)
    use_cuda = str(device).startswith("cuda")
    while True:
        picked = [next(rows) for _ in range(B)]
        batch = torch.from_numpy(np.stack([tokens for _, tokens, _, _ in picked]))
        supervised = torch.from_numpy(np.stack([s for *_, s in picked]))
        if use_cuda:
            batch = batch.pin_memory().to(device, non_blocking=True)
            supervised = supervised.to(device)
        else:
            batch = batch.to(device)
        next_row = picked[-1][0] + world
        # epoch/pq_idx/rg_idx are the keys nanochat.train prints; here pq_idx counts rows
        # "exact" is what nanochat.train saves as loader_XXXXXX_rankR.pt; rows have no packing buffer
        # (the empty one keeps the trainer's snapshot writer, made for nanochat's loader, happy)
        state = {"epoch": 1, "pq_idx": next_row - rank, "rg_idx": 0,
                 "exact": {"next_row": picked[0][0] - rank, "buffer": []}}
        yield batch, supervised, state, torch.tensor([row for row, *_ in picked], dtype=torch.long)


def _targets(batch, supervised):
    """y = the rows shifted by one, with -1 (nanochat's ignore index) where a token is not a target."""
    y = batch[:, 1:].clone()
    y[~supervised[:, 1:]] = -1
    return y


def window_batches(tokenizer, B, history_tokens, horizon_tokens, split="train", device="cpu", mixture=None,
                   seed=0, resume_state_dict=None, sources=SOURCES):
    """Yield (history (B, L), horizon (B, H), state): L + H tokens of one document per row, BOS first."""
    stream = RowStream(tokenizer, history_tokens + horizon_tokens, split, mixture, seed, sources)
    start = (resume_state_dict or {}).get("exact", {}).get("next_row", 0)
    for batch, _, state, _ in _batches(stream, B, start, device):
        yield batch[:, :history_tokens].contiguous(), batch[:, history_tokens:].contiguous(), state


def history_horizon(row, supervised, history_tokens, horizon, min_history, answer_tokens, skip=1):
    """One training example from a row: (history, horizon (H,), horizon_mask (H,) bool).

    history = the row from `skip` (1: after its BOS) up to t, horizon = the next H tokens,
    scored where the row is supervised. t = skip + history_tokens, except in a synthetic row
    (not supervised everywhere): there t is answer_tokens before the end of its first
    supervised span, kept within [skip + min_history, skip + history_tokens] and not before
    the span, so the history ends with the question and the horizon holds the answer."""
    t = skip + history_tokens
    if not bool(supervised[skip + 1:].all()):
        where = torch.nonzero(supervised).squeeze(1)
        if len(where):
            first = int(where[0])
            gaps = torch.nonzero(~supervised[first:]).squeeze(1)
            end = first + (int(gaps[0]) if len(gaps) else len(supervised) - first)
            t = min(max(end - answer_tokens, first, skip + min_history), skip + history_tokens)
    return row[skip:t], row[t:t + horizon], supervised[t:t + horizon]


def example_batches(tokenizer, B, row_tokens, split="train", device="cpu", mixture=None, seed=0,
                    resume_state_dict=None, sources=SOURCES, corpus=None):
    """Yield (rows (B, row_tokens), (supervised (B, row_tokens) bool, row_ids (B,) int64), state)
    forever: whole rows with their supervision and their index in the stream (a pure function
    of (seed, split, index), so an example drawn from row i is the same on any number of ranks).
    Resumes exactly from state (state["exact"]["next_row"]). corpus: a longdocs.TokenCorpus of the
    split (e.g. a real corpus read with longdocs.hf_documents) instead of the offline sources."""
    stream = RowStream(tokenizer, row_tokens, split, mixture, seed, sources, corpus=corpus)
    if stream.skipped:
        print(f"long documents: {len(stream.skipped)} {split} documents shorter than {row_tokens} tokens are "
              f"used only as synthetic filler")
    start = (resume_state_dict or {}).get("exact", {}).get("next_row")
    if start is None:
        start = (resume_state_dict or {}).get("pq_idx", 0)
    for batch, supervised, state, row_ids in _batches(stream, B, start, device):
        yield batch, (supervised, row_ids), state


class LongDocSource:
    """The `longdocs` data source of nanochat.train (see nanochat/hooks.py, get_data_source).

    Config keys (the run config's `data:` section): source (= longdocs), mixture (kind ->
    weight; kinds: natural, passkey, needle, repeat, assoc, vartrack), seed, sources (offline
    text sources, default all of longdocs.SOURCES), source_weights (source -> share of the
    natural rows; default: by length, see natural_document_weights), val_seed, synthetic_targets
    (answers | all, see the module docstring), synthetic_history (tokens before every synthetic
    answer, BOS and question included; default: a random length per row), copy_warmup_rows
    (train rows before the mixture that are copy rows, see the module docstring; default 0)."""

    KEYS = ("source", "mixture", "seed", "sources", "source_weights", "val_seed", "synthetic_targets",
            "synthetic_history", "copy_warmup_rows")

    def __init__(self, config):
        unknown = set(config) - set(self.KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) in the data section: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(self.KEYS)}")
        self.config = dict(config)
        self.mixture = check_mixture(self.config.get("mixture") or DEFAULT_MIXTURE)
        self.seed = int(self.config.get("seed", 0))
        self.val_seed = int(self.config.get("val_seed", 12345))
        self.sources = tuple(self.config.get("sources") or SOURCES)
        self.synthetic_targets = self.config.get("synthetic_targets", "answers")
        self.synthetic_history = self.config.get("synthetic_history")
        self.source_weights = self.config.get("source_weights")
        self.copy_warmup_rows = check_copy_warmup_rows(self.config.get("copy_warmup_rows", 0))

    def describe(self):
        mix = ", ".join(f"{k} {w:g}" for k, w in self.mixture.items())
        by = ", ".join(f"{k} {w:g}" for k, w in self.source_weights.items()) if self.source_weights else "by length"
        warmup = f"{self.copy_warmup_rows:,} copy rows first; " if self.copy_warmup_rows else ""
        return f"long documents ({', '.join(self.sources)}; {warmup}mixture {mix}; natural rows {by}; seed {self.seed})"

    def train_loader(self, tokenizer, B, T, device, resume_state_dict=None):
        """(x, y, state) forever, like nanochat's tokenizing loader; resumes exactly from state."""
        stream = RowStream(tokenizer, T + 1, "train", self.mixture, self.seed, self.sources,
                           synthetic_targets=self.synthetic_targets, synthetic_history=self.synthetic_history,
                           source_weights=self.source_weights, copy_warmup_rows=self.copy_warmup_rows)
        if stream.skipped:
            print(f"long documents: {len(stream.skipped)} train documents shorter than {T} tokens are "
                  f"used only as synthetic filler")
        start = (resume_state_dict or {}).get("exact", {}).get("next_row")
        if start is None:  # a meta file without the snapshot still names the next row
            start = (resume_state_dict or {}).get("pq_idx", 0)
        for batch, supervised, state, _ in _batches(stream, B, start, device):
            yield batch[:, :-1].contiguous(), _targets(batch, supervised), state

    def val_loader(self, tokenizer, B, T, device):
        """(x, y) of the val split: the same rows every time it is built."""
        stream = RowStream(tokenizer, T + 1, "val", self.mixture, self.val_seed, self.sources,
                           synthetic_targets=self.synthetic_targets, synthetic_history=self.synthetic_history,
                           source_weights=self.source_weights)
        for batch, supervised, _, _ in _batches(stream, B, 0, device):
            yield batch[:, :-1].contiguous(), _targets(batch, supervised)
