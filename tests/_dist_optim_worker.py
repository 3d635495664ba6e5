"""
One rank of the multi-process MuonAdamW check in tests/test_optim.py.

The test starts two copies of `python tests/_dist_optim_worker.py OUT_DIR [eager]` with
the env:// variables torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1,
MASTER_PORT); `torchrun --nproc_per_node=2 tests/_dist_optim_worker.py OUT_DIR` works
the same. CPU only, gloo backend. Every rank:
  1. before joining the process group, runs the single-process optimizer on the
     reference gradients (the reference result, computed by the same kernels);
  2. joins the group and runs the distributed optimizer on rank-specific gradients
     whose average over ranks is the reference gradient;
  3. saves both results and its (sharded) optimizer state to OUT_DIR/rank{r}.pt.
The test compares them. 'eager' runs the fused kernels uncompiled, which checks the
communication and sharding logic without paying for torch.compile in each process.

The problem is chosen to hit every distributed code path with small tensors:
a small AdamW param (all_reduce), a large one (reduce-scatter + all-gather of rows),
a Muon group of 3 matrices (padded to 4: rank 1 owns one real matrix and padding),
and a Muon group of 1 tall matrix (rank 1 owns nothing).
"""

import os
import sys

import torch
import torch.distributed as dist

SHAPES = {
    "gains": (6,),           # AdamW, < 1024 elements
    "embed": (64, 32),       # AdamW, 2048 elements, rows divisible by 2
    "wide.0": (16, 32),      # Muon group of three wide matrices
    "wide.1": (16, 32),
    "wide.2": (16, 32),
    "tall.0": (32, 16),      # Muon group of one tall matrix
}
LRS = [1.0, 0.5]  # LR multiplier per step, so a schedule change is exercised too


def make_params():
    gen = torch.Generator().manual_seed(1234)
    return {name: torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1) for name, shape in SHAPES.items()}


def make_optimizer(params):
    from nanochat.optim import MuonAdamW
    groups = [
        dict(kind="adamw", params=[params["gains"]], lr=0.05, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="adamw", params=[params["embed"]], lr=0.1, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01),
        dict(kind="muon", params=[params[f"wide.{i}"] for i in range(3)], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2),
        dict(kind="muon", params=[params["tall.0"]], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2),
    ]
    opt = MuonAdamW(groups)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def reference_grad(name, step):
    gen = torch.Generator().manual_seed(100 * step + sorted(SHAPES).index(name))
    return torch.randn(SHAPES[name], generator=gen) * 0.01


def rank_grad(name, step, rank, world_size):
    """Reference grad plus a per-rank offset; the offsets sum to zero over ranks."""
    gen = torch.Generator().manual_seed(7777 + 100 * step + sorted(SHAPES).index(name))
    offset = torch.randn(SHAPES[name], generator=gen) * 0.01
    return reference_grad(name, step) + offset * (2 * rank - (world_size - 1))


def run(grad_fn):
    params = make_params()
    opt = make_optimizer(params)
    for step, lrm in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
        for name, p in params.items():
            p.grad = grad_fn(name, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {name: p.detach().clone() for name, p in params.items()}, opt.state_dict()


def main():
    out_dir = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "eager":
        torch.compiler.set_stance("force_eager")
    torch.set_num_threads(1)

    # 1. single process: torch.distributed is not initialised yet
    reference, _ = run(reference_grad)

    # 2. distributed, gloo on CPU; RANK/WORLD_SIZE/MASTER_* come from the environment
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result, state = run(lambda name, step: rank_grad(name, step, rank, world_size))
    dist.barrier()
    dist.destroy_process_group()

    torch.save(dict(rank=rank, world_size=world_size, reference=reference, result=result, state=state),
               os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
