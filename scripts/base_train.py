"""
Pretrain a base model. From the root of the repo:

    python -m scripts.base_train

or distributed:

    torchrun --nproc_per_node=8 -m scripts.base_train

On a CPU, train something much smaller, e.g.:

    python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 --core-metric-every=-1 --total-batch-size=512 --num-iterations=20

Flags are upstream nanochat's. The loop itself lives in nanochat/train.py, which also runs
from a YAML config: python -m nanochat.train --config configs/cpu_tiny.yaml
"""

from nanochat.train import build_parser, run_cli

if __name__ == "__main__":
    run_cli(build_parser().parse_args())
