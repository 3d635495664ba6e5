"""
Pretraining dataloader: tokenizes parquet shards on the fly and packs documents into
(B, T) rows, sharded across DDP ranks and resumable from a small state dict.

Packing is "BOS-aligned best-fit":
- every row begins with a document's BOS token, so no token in a batch has to attend
  across a boundary into the middle of some other document it cannot see the start of;
- a row is filled greedily with the longest buffered document that still fits whole;
- when nothing fits any more, the shortest buffered document is cropped to fill the
  rest of the row exactly. Rows are never padded: every position is trained on.
The price is the cropped tails (roughly a third of all tokens at T=2048); in exchange
the model always sees documents from their beginning. With very little data and very
long documents, a plain concatenate-and-chunk loader (nanochat before 2026) wastes less.
"""

import bisect

import torch
import pyarrow.parquet as pq

from nanochat.common import get_dist_info
from nanochat.dataset import split_parquet_files


def _document_batches(split, resume_state_dict, tokenizer_batch_size, exact_position=None):
    """
    Endless stream of (texts, (pq_idx, rg_idx, epoch), next_position): lists of at most
    tokenizer_batch_size documents, tagged with where they came from, and the position
    (pq_idx, rg_idx, doc_offset, epoch) at which the stream would continue after them.

    Rank r of a world of size W reads row groups r, r+W, r+2W, ... of every shard, so
    ranks never see the same documents. epoch starts at 1 and grows each full pass.
    Resuming from an upstream state dict is approximate: we restart at the row group
    *after* the saved one (the documents of the saved row group still sitting in the
    packing buffer are lost). Resuming from an exact_position continues at that very
    document (see the exact resume note in the loader below).
    """
    _, rank, _, world_size = get_dist_info()
    # only rank 0 shouts about the legacy dataset, and only once (for train)
    paths = split_parquet_files(split, warn_on_legacy=(rank == 0 and split == "train"))

    resuming = resume_state_dict is not None or exact_position is not None
    pq_idx = resume_state_dict["pq_idx"] if resume_state_dict is not None else 0
    resume_rg_idx = resume_state_dict["rg_idx"] if resume_state_dict is not None else None
    epoch = resume_state_dict.get("epoch", 1) if resume_state_dict is not None else 1
    doc_offset = 0
    if exact_position is not None:
        pq_idx, exact_rg_idx, doc_offset, epoch = exact_position
        resume_rg_idx = None

    while True:
        yielded_this_pass = False
        while pq_idx < len(paths):
            pf = pq.ParquetFile(paths[pq_idx])
            rg_idx = rank
            if resume_rg_idx is not None:
                # first row group of ours that comes after the saved one; that may be
                # past the end of this shard, in which case we go on to the next shard
                rg_idx = (resume_rg_idx // world_size + 1) * world_size + rank
                resume_rg_idx = None
            if exact_position is not None:
                rg_idx, exact_position = exact_rg_idx, None
            for rg_idx in range(rg_idx, pf.num_row_groups, world_size):
                texts = pf.read_row_group(rg_idx).column("text").to_pylist()
                for i in range(doc_offset, len(texts), tokenizer_batch_size):
                    yielded_this_pass = True
                    yield texts[i:i + tokenizer_batch_size], (pq_idx, rg_idx, epoch), (pq_idx, rg_idx, i + tokenizer_batch_size, epoch)
                doc_offset = 0
            pq_idx += 1
        if not yielded_this_pass and not resuming:
            # without this guard a rank with no row groups would spin here forever
            raise RuntimeError(f"rank {rank} of {world_size} has no documents in the {split} split "
                               f"({len(paths)} shard(s)): each rank needs at least one row group per "
                               f"pass; download more shards with `python -m nanochat.dataset -n 8`")
        resuming, resume_rg_idx = False, None  # (a saved pq_idx may lie past the last shard)
        pq_idx = 0
        epoch += 1


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
    tokenizer, B, T, split,
    tokenizer_threads=4, tokenizer_batch_size=128,
    device="cuda", resume_state_dict=None,
    buffer_size=1000, exact_resume=False
):
    """
    Yield (inputs, targets, state_dict) forever: int64 (B, T) tensors on `device`, with
    targets equal to inputs shifted left by one, and state_dict = {'pq_idx', 'rg_idx',
    'epoch'} locating the most recently tokenized row group. Pass a saved state_dict as
    resume_state_dict to continue (approximately) from there.

    Documents are tokenized with a BOS prepended and kept in a buffer of at least
    buffer_size documents; the larger the buffer, the better the best-fit packing.

    The yielded tensors are views into one persistent device buffer that the next
    batch overwrites: clone them if you need to keep a batch around.

    Exact resume (our addition; upstream resumes approximately): with exact_resume=True
    each yielded state_dict also carries "exact", a snapshot of the loader taken just
    before it built that batch (stream position, packing buffer, arrival counter). Give
    such a state_dict back as resume_state_dict and the first batch yielded is that same
    batch again, and every later one follows as in an uninterrupted run. The snapshot
    holds up to buffer_size tokenized documents, so nanochat.train saves it beside the
    checkpoint (loader_XXXXXX_rankR.pt) rather than in the meta JSON.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    row_capacity = T + 1  # one extra token so that targets can be the shifted inputs
    bos_token = tokenizer.get_bos_token_id()
    state = (0, 0, 1)  # (pq_idx, rg_idx, epoch) of the last row group tokenized

    # The buffer holds (length, arrival number, tokens) sorted ascending, so the best
    # fit is found by bisection and the shortest document is always first. The arrival
    # number breaks ties in favour of the document that has waited longest.
    doc_buffer = []
    next_arrival = 0
    position = None  # where the document stream continues after the last chunk read

    exact = (resume_state_dict or {}).get("exact")
    if exact is not None:
        state, next_arrival = tuple(exact["state"]), exact["next_arrival"]
        position = tuple(exact["position"]) if exact["position"] is not None else None  # None: nothing read yet
        doc_buffer = unpack_doc_buffer(exact)
        batches = _document_batches(split, None, tokenizer_batch_size, exact_position=position)
    else:
        batches = _document_batches(split, resume_state_dict, tokenizer_batch_size)

    def refill():
        nonlocal state, next_arrival, position
        texts, state, position = next(batches)
        for tokens in tokenizer.encode(texts, prepend=bos_token, num_threads=tokenizer_threads):
            bisect.insort(doc_buffer, (len(tokens), next_arrival, tokens))
            next_arrival += 1

    def take(remaining):
        # the longest document of at most `remaining` tokens (earliest arrival among equals)...
        hi = bisect.bisect_right(doc_buffer, (remaining, float("inf")))
        if hi > 0:
            best_len = doc_buffer[hi - 1][0]
            return doc_buffer.pop(bisect.bisect_left(doc_buffer, (best_len, -1)))[2]
        # ...or, if none is that short, the shortest one, cropped to fit
        return doc_buffer.pop(0)[2][:remaining]

    # Rows are assembled on the CPU, staged in (pinned, on CUDA) memory laid out as
    # [inputs | targets], and sent to the device in a single copy.
    use_cuda = torch.device(device).type == "cuda"
    rows = torch.empty((B, row_capacity), dtype=torch.long)
    staging = torch.empty(2 * B * T, dtype=torch.long, pin_memory=use_cuda)
    on_device = torch.empty(2 * B * T, dtype=torch.long, device=device)
    staged_inputs, staged_targets = staging[:B * T].view(B, T), staging[B * T:].view(B, T)
    inputs, targets = on_device[:B * T].view(B, T), on_device[B * T:].view(B, T)
    # The async copy reads the pinned buffer whenever the GPU gets to it; make sure the
    # previous one has happened before we overwrite that buffer with the next batch.
    copied = torch.cuda.Event() if use_cuda else None

    while True:
        if exact_resume:
            # tuples and their token lists are never mutated, so a shallow copy is a snapshot
            snapshot = {"state": state, "position": position, "next_arrival": next_arrival, "buffer": list(doc_buffer)}
        for r in range(B):
            row = []
            while len(row) < row_capacity:
                while len(doc_buffer) < buffer_size:
                    refill()
                row.extend(take(row_capacity - len(row)))
            rows[r] = torch.tensor(row, dtype=torch.long)
        if copied is not None:
            copied.synchronize()
        staged_inputs.copy_(rows[:, :-1])
        staged_targets.copy_(rows[:, 1:])
        on_device.copy_(staging, non_blocking=use_cuda)
        if copied is not None:
            copied.record()
        pq_idx, rg_idx, epoch = state
        state_dict = {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch}
        if exact_resume:
            state_dict["exact"] = snapshot
        yield inputs, targets, state_dict


def pack_doc_buffer(snapshot):
    """An exact-resume snapshot as compact tensors (for torch.save): flat tokens, lengths, arrivals."""
    buffer = snapshot["buffer"]
    tokens = [t for _, _, doc in buffer for t in doc]
    out = {k: v for k, v in snapshot.items() if k != "buffer"}
    out["lengths"] = torch.tensor([n for n, _, _ in buffer], dtype=torch.int64)
    out["arrivals"] = torch.tensor([a for _, a, _ in buffer], dtype=torch.int64)
    out["tokens"] = torch.tensor(tokens, dtype=torch.int64)
    return out


def unpack_doc_buffer(exact):
    """Rebuild the sorted (length, arrival, tokens) buffer from a snapshot (packed or not)."""
    if "buffer" in exact:
        return list(exact["buffer"])
    tokens = exact["tokens"].tolist()
    buffer, start = [], 0
    for n, a in zip(exact["lengths"].tolist(), exact["arrivals"].tolist()):
        buffer.append((n, a, tokens[start:start + n]))
        start += n
    return buffer


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """Same batches as tokenizing_distributed_data_loader_with_state_bos_bestfit, without the state dict."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets
