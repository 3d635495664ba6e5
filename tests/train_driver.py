"""
Run nanochat.train.train() with base_train flags and write a JSON summary; used by test_train.py.

    python tests/train_driver.py OUT_PREFIX [--emulate-ranks=N] [--import=MODULE] -- <base_train flags>
    torchrun --nproc_per_node=2 tests/train_driver.py OUT_PREFIX -- <base_train flags>

Writes OUT_PREFIX.rank<R>.json with the per-step losses. With --emulate-ranks=N a single
process feeds micro-step k of every step from the data stream rank k would read in an
N-process run, so its batches are exactly those of the N ranks together. --import=MODULE
imports a module first (e.g. megacontext.variant, to show that merely importing it changes
nothing in a vanilla run).
"""
import sys
import json
import itertools
import contextlib
import importlib

import nanochat.train as train_lib
import nanochat.dataloader as dataloader_lib


@contextlib.contextmanager
def pretend_rank(rank, world_size):
    real = dataloader_lib.get_dist_info
    dataloader_lib.get_dist_info = lambda: (True, rank, rank, world_size)
    try:
        yield
    finally:
        dataloader_lib.get_dist_info = real


def interleaved_loader(world_size):
    real_loader = dataloader_lib.tokenizing_distributed_data_loader_with_state_bos_bestfit

    def loader(*args, **kwargs):
        streams = []
        for rank in range(world_size):
            stream = real_loader(*args, **kwargs)
            with pretend_rank(rank, world_size):
                first = next(stream)  # the generator reads the rank on its first step
            streams.append(itertools.chain([first], stream))
        while True:
            for stream in streams:
                yield next(stream)
    return loader


def main():
    argv = sys.argv[1:]
    out_prefix = argv.pop(0)
    emulate = 0
    if argv and argv[0].startswith("--emulate-ranks="):
        emulate = int(argv.pop(0).split("=")[1])
    if argv and argv[0].startswith("--import="):
        importlib.import_module(argv.pop(0).split("=", 1)[1])
    if argv and argv[0] == "--":
        argv.pop(0)
    if emulate:
        train_lib.tokenizing_distributed_data_loader_with_state_bos_bestfit = interleaved_loader(emulate)
    args = train_lib.build_parser().parse_args(argv)
    result = train_lib.train(args)
    from nanochat.common import get_dist_info
    rank = get_dist_info()[1]
    summary = {k: result[k] for k in ("train_losses", "val_bpb", "step", "checkpoint_dir")}
    summary["modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "megacontext")
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump(summary, f)
    train_lib.compute_cleanup()


if __name__ == "__main__":
    main()
