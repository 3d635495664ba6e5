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

import torch
import pyarrow.parquet as pq

from nanochat.common import get_dist_info
from nanochat.dataset import split_parquet_files


def _document_batches(split, resume_state_dict, tokenizer_batch_size, exact_position=None):
    """
    Endless stream of (texts, (pq_idx, rg_idx, epoch), next_position): lists of at most
    tokenizer_batch_size documents, tagged with where they came from, and (ours, for exact
    resume) the position (pq_idx, rg_idx, doc_offset, epoch) at which the stream continues.

    Rank r of a world of size W reads row groups r, r+W, r+2W, ... of every shard, so
    ranks never see the same documents. epoch starts at 1 and grows each full pass.
    Resuming from an upstream state dict is approximate: we restart at the row group
    *after* the saved one (the documents of the saved row group still sitting in the
    packing buffer are lost). Resuming from an exact_position continues at that very
    document (see the exact resume note in the loader below).
    """
    ddp, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()

    # only rank 0 shouts about the legacy dataset, and only once (for train)
    warn_on_legacy = ddp_rank == 0 and split == "train"
    parquet_paths = split_parquet_files(split, warn_on_legacy=warn_on_legacy)  # ours: one-line errors, same split

    resume_pq_idx = resume_state_dict["pq_idx"] if resume_state_dict is not None else 0
    resume_rg_idx = resume_state_dict["rg_idx"] if resume_state_dict is not None else None
    resume_epoch = resume_state_dict.get("epoch", 1) if resume_state_dict is not None else 1
    resume_doc_offset = 0
    if exact_position is not None:  # ours: exact resume
        resume_pq_idx, resume_rg_idx, resume_doc_offset, resume_epoch = exact_position
    first_pass = True
    pq_idx = resume_pq_idx
    epoch = resume_epoch

    while True:  # one pass over the split per epoch, forever
        pq_idx = resume_pq_idx if first_pass else 0
        yielded_this_pass = False  # ours: see the guard below
        while pq_idx < len(parquet_paths):
            filepath = parquet_paths[pq_idx]
            pf = pq.ParquetFile(filepath)
            doc_offset = 0
            if first_pass and (resume_rg_idx is not None) and (pq_idx == resume_pq_idx):
                if exact_position is not None:
                    # ours: the saved row group itself, from the saved document on
                    rg_idx, doc_offset = resume_rg_idx, resume_doc_offset
                else:
                    # first row group of ours that comes after the saved one; that may be
                    # past the end of this shard, in which case we go on to the next shard
                    base_idx = resume_rg_idx // ddp_world_size
                    base_idx += 1
                    rg_idx = base_idx * ddp_world_size + ddp_rank
                if rg_idx >= pf.num_row_groups:
                    pq_idx += 1
                    continue
                resume_rg_idx = None
            else:
                rg_idx = ddp_rank
            while rg_idx < pf.num_row_groups:
                rg = pf.read_row_group(rg_idx)
                batch = rg.column('text').to_pylist()
                for i in range(doc_offset, len(batch), tokenizer_batch_size):
                    yielded_this_pass = True
                    yield batch[i:i+tokenizer_batch_size], (pq_idx, rg_idx, epoch), (pq_idx, rg_idx, i + tokenizer_batch_size, epoch)
                doc_offset = 0
                rg_idx += ddp_world_size
            pq_idx += 1
        if not yielded_this_pass and not (first_pass and (resume_state_dict is not None or exact_position is not None)):
            # ours: without this guard a rank with no row groups would spin here forever
            # (a resumed first pass may legitimately be empty: the saved pq_idx was the last shard)
            raise RuntimeError(f"rank {ddp_rank} of {ddp_world_size} has no documents in the {split} split "
                               f"({len(parquet_paths)} shard(s)): each rank needs at least one row group per "
                               f"pass; download more shards with `python -m nanochat.dataset -n 8`")
        first_pass = False
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

    Each row is packed best-fit: the longest buffered document that still fits whole
    (the earliest one among equals), again and again; when none fits, the shortest
    buffered document is cropped to fill the row exactly. Documents are tokenized with a
    BOS prepended and kept in a buffer of at least buffer_size documents; the larger the
    buffer, the better the packing.

    The yielded tensors are views into one persistent device buffer that the next
    batch overwrites: clone them if you need to keep a batch around.

    Exact resume (ours; upstream resumes approximately): with exact_resume=True each
    yielded state_dict also carries "exact", a snapshot of the loader taken just before
    it built that batch (stream position and packing buffer). Give such a state_dict back
    as resume_state_dict and the first batch yielded is that same batch again, and every
    later one follows as in an uninterrupted run. The snapshot holds up to buffer_size
    tokenized documents, so nanochat.train saves it beside the checkpoint
    (loader_XXXXXX_rankR.pt) rather than in the meta JSON.
    """
    if split not in ("train", "val"):  # ours: a clear error instead of an assert
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    row_capacity = T + 1  # one extra token so that targets can be the shifted inputs
    exact = (resume_state_dict or {}).get("exact")  # ours: exact resume
    if exact is None:
        batches = _document_batches(split, resume_state_dict, tokenizer_batch_size)
    else:
        exact_position = tuple(exact["position"]) if exact["position"] is not None else None  # None: nothing read yet
        batches = _document_batches(split, None, tokenizer_batch_size, exact_position=exact_position)
    bos_token = tokenizer.get_bos_token_id()
    doc_buffer = []  # token lists, in arrival order
    pq_idx, rg_idx, epoch = 0, 0, 1
    position = None  # ours: where the document stream continues after the last chunk read
    if exact is not None:
        (pq_idx, rg_idx, epoch), position = tuple(exact["state"]), exact_position
        doc_buffer = unpack_doc_buffer(exact)

    def refill_buffer():
        nonlocal pq_idx, rg_idx, epoch, position
        doc_batch, (pq_idx, rg_idx, epoch), position = next(batches)
        token_lists = tokenizer.encode(doc_batch, prepend=bos_token, num_threads=tokenizer_threads)
        for tokens in token_lists:
            doc_buffer.append(tokens)

    # Rows are assembled on the CPU, staged in (pinned, on CUDA) memory laid out as
    # [inputs | targets], and sent to the device in a single copy.
    use_cuda = torch.device(device).type == "cuda"  # ours: also "cuda:0"
    row_buffer = torch.empty((B, row_capacity), dtype=torch.long)
    cpu_buffer = torch.empty(2 * B * T, dtype=torch.long, pin_memory=use_cuda)
    gpu_buffer = torch.empty(2 * B * T, dtype=torch.long, device=device)
    cpu_inputs = cpu_buffer[:B * T].view(B, T)
    cpu_targets = cpu_buffer[B * T:].view(B, T)
    inputs = gpu_buffer[:B * T].view(B, T)
    targets = gpu_buffer[B * T:].view(B, T)
    # ours: the async copy reads the pinned buffer whenever the GPU gets to it; make sure
    # the previous one has happened before we overwrite that buffer with the next batch
    copied = torch.cuda.Event() if use_cuda else None

    while True:
        if exact_resume:
            # ours: token lists are never mutated (only popped or sliced), so a shallow copy is a snapshot
            snapshot = {"state": (pq_idx, rg_idx, epoch), "position": position, "buffer": list(doc_buffer)}
        for row_idx in range(B):
            pos = 0
            while pos < row_capacity:
                while len(doc_buffer) < buffer_size:
                    refill_buffer()

                remaining = row_capacity - pos

                # the longest document that fits whole (strict >: the earliest among equals)
                best_idx = -1
                best_len = 0
                for i, doc in enumerate(doc_buffer):
                    doc_len = len(doc)
                    if doc_len <= remaining and doc_len > best_len:
                        best_idx = i
                        best_len = doc_len

                if best_idx >= 0:
                    doc = doc_buffer.pop(best_idx)
                    doc_len = len(doc)
                    row_buffer[row_idx, pos:pos + doc_len] = torch.tensor(doc, dtype=torch.long)
                    pos += doc_len
                else:
                    # nothing fits: crop the shortest document to the exact space left
                    shortest_idx = min(range(len(doc_buffer)), key=lambda i: len(doc_buffer[i]))
                    doc = doc_buffer.pop(shortest_idx)
                    row_buffer[row_idx, pos:pos + remaining] = torch.tensor(doc[:remaining], dtype=torch.long)
                    pos += remaining

        if copied is not None:
            copied.synchronize()
        cpu_inputs.copy_(row_buffer[:, :-1])
        cpu_targets.copy_(row_buffer[:, 1:])

        state_dict = {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch}
        if exact_resume:
            state_dict["exact"] = snapshot

        gpu_buffer.copy_(cpu_buffer, non_blocking=use_cuda)
        if copied is not None:
            copied.record()
        yield inputs, targets, state_dict

def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """Same batches as tokenizing_distributed_data_loader_with_state_bos_bestfit, without the state dict."""
    for inputs, targets, state_dict in tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs):
        yield inputs, targets

# -----------------------------------------------------------------------------
# Ours: exact-resume snapshots on disk


def pack_doc_buffer(snapshot):
    """An exact-resume snapshot as compact tensors (for torch.save): flat tokens and lengths."""
    buffer = snapshot["buffer"]
    out = {k: v for k, v in snapshot.items() if k != "buffer"}
    out["lengths"] = torch.tensor([len(doc) for doc in buffer], dtype=torch.int64)
    out["tokens"] = torch.tensor([t for doc in buffer for t in doc], dtype=torch.int64)
    return out


def unpack_doc_buffer(exact):
    """The buffer (token lists in arrival order) of a snapshot, packed or not. Snapshots
    written before the loader kept its buffer in arrival order hold (length, arrival,
    tokens) entries or an 'arrivals' tensor; those are put back in arrival order."""
    if "buffer" in exact:
        buffer = list(exact["buffer"])
        if buffer and isinstance(buffer[0], tuple):
            buffer = [doc for _, _, doc in sorted(buffer, key=lambda e: e[1])]
        return buffer
    tokens = exact["tokens"].tolist()
    docs, start = [], 0
    for n in exact["lengths"].tolist():
        docs.append(tokens[start:start + n])
        start += n
    if "arrivals" in exact:
        order = sorted(range(len(docs)), key=lambda i: exact["arrivals"][i].item())
        docs = [docs[i] for i in order]
    return docs
