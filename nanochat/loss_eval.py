"""
Loss-based evaluation of a base model: bits per byte (bpb).

Mean cross-entropy per token depends on the tokenizer (a bigger vocab packs more text
into each token, so its per-token loss is higher for the same model quality). Dividing
the summed loss by the number of bytes the target tokens stand for removes that
dependence, so runs with different vocab sizes can be compared directly.
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    Bits per byte of `model` over the first `steps` (x, y) batches of `batches`.

    token_bytes is a (vocab_size,) integer tensor with the UTF-8 length of every token id
    and 0 for ids that must not count (the special tokens). A target contributes its loss
    and its bytes only if it is a real token (y >= 0, not the -1 ignore index) with a
    non-zero byte length. Under torch.distributed the nats and byte counts are summed over
    all ranks before dividing, so every rank returns the same number.
    """
    total_nats = torch.tensor(0.0, dtype=torch.float32, device=model.get_device())
    total_bytes = torch.tensor(0, dtype=torch.int64, device=model.get_device())
    batch_iter = iter(batches)
    for step in range(steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:  # ours: a clear error instead of a bare StopIteration
            raise ValueError(f"evaluate_bpb was asked for {steps} steps but the batches ran out after {step}; "
                             f"pass fewer steps or a longer (or repeating) loader") from None
        loss2d = model(x, y, loss_reduction='none')  # (B*T,), 0 at ignored targets
        loss2d = loss2d.view(-1)
        y = y.view(-1)
        if (y.int() < 0).any():  # int32: MPS has no int64 kernel for this comparison
            # ignored targets (-1) must not index token_bytes: give them id 0, then zero their bytes
            valid = y >= 0
            y_safe = torch.where(valid, y, torch.zeros_like(y))
            num_bytes2d = torch.where(
                valid,
                token_bytes[y_safe],
                torch.zeros_like(y, dtype=token_bytes.dtype)
            )
            total_nats += (loss2d * (num_bytes2d > 0)).sum()
            total_bytes += num_bytes2d.sum()
        else:
            # no ignored targets: index directly
            num_bytes2d = token_bytes[y]
            total_nats += (loss2d * (num_bytes2d > 0)).sum()
            total_bytes += num_bytes2d.sum()
    # sum over ranks, so every rank returns the same number
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_nats = total_nats.item()
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        # nothing countable was seen (e.g. only special tokens): report "infinitely bad", as upstream does
        return float('inf')
    bpb = total_nats / (math.log(2) * total_bytes)
    return bpb
