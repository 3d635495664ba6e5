"""
Small shared helpers used by every nanochat script and module: the compute dtype,
logging, the base directory for artifacts, rank-aware printing, process/device setup
(single process, torchrun on CUDA with NCCL, torchrun on CPU with gloo), and
peak-throughput tables for MFU/MBU reporting.

Ours beside upstream's (marked `ours:`): a bad NANOCHAT_DTYPE or device type is one
ValueError/RuntimeError line; log colours only on a terminal (NO_COLOR honoured) and
torch's "No CUDA runtime is found" warning filtered; torchrun on CPU joins a gloo
process group; and, at the end, a Progress bar for long stages.
"""

import os
import re
import sys
import time
import logging
import urllib.request
import torch
import torch.distributed as dist
from filelock import FileLock

# Master weights are kept in fp32 (the optimizer wants the precision); matmuls and
# activations run in COMPUTE_DTYPE. Our Linear casts its weight on the fly, which is
# what lets us avoid torch.amp.autocast entirely. It is decided once, at import time;
# NANOCHAT_DTYPE=bfloat16|float16|float32 overrides the detection.
_DTYPE_MAP = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
def _detect_compute_dtype():
    env = os.environ.get("NANOCHAT_DTYPE")
    if env is not None:
        if env not in _DTYPE_MAP:  # ours: a ValueError naming the choices, not a KeyError
            raise ValueError(f"NANOCHAT_DTYPE={env!r} is not supported; "
                             f"use one of {', '.join(_DTYPE_MAP)} or unset it")
        return _DTYPE_MAP[env], f"set via NANOCHAT_DTYPE={env}"
    if torch.cuda.is_available():
        # Ampere (SM 80) and newer have bf16 tensor cores
        capability = torch.cuda.get_device_capability()
        if capability >= (8, 0):
            return torch.bfloat16, f"auto-detected: CUDA SM {capability[0]}{capability[1]} (bf16 supported)"
        # Volta/Turing only do fp16 on tensor cores, and fp16 training would need a
        # GradScaler which we do not have, so stay in fp32. NANOCHAT_DTYPE=float16 forces it.
        return torch.float32, f"auto-detected: CUDA SM {capability[0]}{capability[1]} (pre-Ampere, bf16 not supported, using fp32)"
    # CPU, and MPS (which can do bf16 on recent macOS, but only as an explicit opt-in)
    return torch.float32, "auto-detected: no CUDA (CPU/MPS)"
COMPUTE_DTYPE, COMPUTE_DTYPE_REASON = _detect_compute_dtype()

class ColoredFormatter(logging.Formatter):
    """Log formatter that colours the level name and makes sizes/shard names stand out."""
    COLORS = {
        'DEBUG': '\033[36m',    # cyan
        'INFO': '\033[32m',     # green
        'WARNING': '\033[33m',  # yellow
        'ERROR': '\033[31m',    # red
        'CRITICAL': '\033[35m', # magenta
    }
    RESET = '\033[0m'
    BOLD = '\033[1m'
    def format(self, record):
        levelname = record.levelname
        if levelname in self.COLORS:
            record.levelname = f"{self.COLORS[levelname]}{self.BOLD}{levelname}{self.RESET}"
        message = super().format(record)
        if levelname == 'INFO':
            # download/dataset progress lines are easier to scan with the numbers in bold
            message = re.sub(r'(\d+\.?\d*\s*(?:GB|MB|%|docs))', rf'{self.BOLD}\1{self.RESET}', message)
            message = re.sub(r'(Shard \d+)', rf'{self.COLORS["INFO"]}{self.BOLD}\1{self.RESET}', message)
        return message

def setup_default_logging():
    handler = logging.StreamHandler()
    formatter = ColoredFormatter if use_color(handler.stream) else logging.Formatter  # ours: see use_color
    handler.setFormatter(formatter('%(asctime)s - %(name)s - %(levelname)s - %(message)s'))
    logging.basicConfig(
        level=logging.INFO,
        handlers=[handler]
    )

def use_color(stream):
    """Ours: ANSI colours only for a terminal: a log piped to a file (speedrun.sh tees every
    stage) must stay plain text. NO_COLOR=1 turns them off on a terminal too."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())

def _drop_cpu_cuda_home_warning(record):
    # ours: torch.utils.cpp_extension (imported by torch.compile's inductor) warns "No CUDA runtime
    # is found, using CUDA_HOME=..." on every CPU run of a CUDA build of torch that finds a
    # CUDA toolkit directory: expected here, and it says nothing about the run.
    return not record.getMessage().startswith("No CUDA runtime is found")

logging.getLogger("torch.utils.cpp_extension").addFilter(_drop_cpu_cuda_home_warning)

setup_default_logging()
logger = logging.getLogger(__name__)

def get_base_dir():
    # all nanochat artifacts (data, tokenizer, checkpoints, reports) live under one directory:
    # NANOCHAT_BASE_DIR if set, else ~/.cache/nanochat beside other cached data; created if missing
    if os.environ.get("NANOCHAT_BASE_DIR"):
        nanochat_dir = os.environ.get("NANOCHAT_BASE_DIR")
    else:
        home_dir = os.path.expanduser("~")
        cache_dir = os.path.join(home_dir, ".cache")
        nanochat_dir = os.path.join(cache_dir, "nanochat")
    os.makedirs(nanochat_dir, exist_ok=True)
    return nanochat_dir

def download_file_with_lock(url, filename, postprocess_fn=None):
    """
    Fetch `url` into <base_dir>/<filename> unless it is already there, and return the path.
    A file lock makes sure that when many ranks ask at once, exactly one downloads while
    the others wait and then reuse the result. postprocess_fn(path) runs once, after download.
    """
    base_dir = get_base_dir()
    file_path = os.path.join(base_dir, filename)
    lock_path = file_path + ".lock"

    if os.path.exists(file_path):
        return file_path

    with FileLock(lock_path):
        # another rank may have finished the download while we waited for the lock
        if os.path.exists(file_path):
            return file_path

        print(f"Downloading {url}...")
        with urllib.request.urlopen(url) as response:
            content = response.read()

        with open(file_path, 'wb') as f:
            f.write(content)
        print(f"Downloaded to {file_path}")

        if postprocess_fn is not None:
            postprocess_fn(file_path)

    return file_path

def print0(s="",**kwargs):
    # rank read from torchrun's env, so it works before the process group exists
    ddp_rank = int(os.environ.get('RANK', 0))
    if ddp_rank == 0:
        print(s, **kwargs)

def print_banner():
    banner = r"""
                                   _           _
      _ __   __ _ _ __   ___   ___| |__   __ _| |_
     | '_ \ / _` | '_ \ / _ \ / __| '_ \ / _` | __|
     | | | | (_| | | | | (_) | (__| | | | (_| | |_
     |_| |_|\__,_|_| |_|\___/ \___|_| |_|\__,_|\__|
    """
    print0(banner)

def is_ddp_requested() -> bool:
    """True when torchrun's env vars are present, i.e. we *should* join a process group
    (whether or not it has been initialised yet)."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))

def is_ddp_initialized() -> bool:
    """True when a torch.distributed process group actually exists (so cleanup is safe)."""
    return dist.is_available() and dist.is_initialized()

def get_dist_info():
    # (ddp, rank, local_rank, world_size) from torchrun's env; compute_init does the joining
    if is_ddp_requested():
        assert all(var in os.environ for var in ['RANK', 'LOCAL_RANK', 'WORLD_SIZE'])
        ddp_rank = int(os.environ['RANK'])
        ddp_local_rank = int(os.environ['LOCAL_RANK'])
        ddp_world_size = int(os.environ['WORLD_SIZE'])
        return True, ddp_rank, ddp_local_rank, ddp_world_size
    else:
        return False, 0, 0, 1

def autodetect_device_type():
    # CUDA if we have it, then Apple's MPS, then plain CPU
    if torch.cuda.is_available():
        device_type = "cuda"
    elif torch.backends.mps.is_available():
        device_type = "mps"
    else:
        device_type = "cpu"
    print0(f"Autodetected device type: {device_type}")
    return device_type

def compute_init(device_type="cuda"): # cuda|cpu|mps
    """
    The setup every script does: validate the device, seed, set matmul precision and,
    under torchrun, join the process group (NCCL on CUDA, gloo on CPU).
    Returns (ddp, ddp_rank, ddp_local_rank, ddp_world_size, device).
    """

    # ours: ValueError/RuntimeError lines naming the fix, where upstream asserts
    if device_type not in VALID_DEVICE_TYPES:
        raise ValueError(f"unknown device type {device_type!r}; "
                         f"choose one of {', '.join(VALID_DEVICE_TYPES)}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device type 'cuda' requested but CUDA is not available in this "
                           "PyTorch install; pass --device-type=cpu (or mps on Apple silicon)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device type 'mps' requested but MPS is not available; "
                           "pass --device-type=cpu")

    # Most of the code uses explicit generators; the global seed matters mainly for
    # weight init, which draws from the global RNG.
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)

    if device_type == "cuda":
        # allow TF32 for fp32 matmuls: a big speedup on Ampere+ for a negligible precision cost
        torch.set_float32_matmul_precision("high")

    is_ddp_requested, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()
    if is_ddp_requested and device_type == "cuda":
        device = torch.device("cuda", ddp_local_rank)
        torch.cuda.set_device(device)  # so that bare "cuda" means this rank's GPU
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif is_ddp_requested and device_type == "cpu":
        # ours: torchrun on CPU; gloo is the collective backend that works without a GPU
        device = torch.device("cpu")
        if not is_ddp_initialized():
            dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type) # mps|cpu

    if ddp_rank == 0:
        logger.info(f"Distributed world size: {ddp_world_size}")

    return is_ddp_requested, ddp_rank, ddp_local_rank, ddp_world_size, device

VALID_DEVICE_TYPES = ("cuda", "mps", "cpu")  # ours: named in compute_init's error

def compute_cleanup():
    """Undo compute_init before exit: tear down the process group if one exists."""
    if is_ddp_initialized():
        dist.destroy_process_group()

class DummyWandb:
    """Stands in for a wandb run when logging is off: same methods, does nothing."""
    def __init__(self):
        pass
    def log(self, *args, **kwargs):
        pass
    def finish(self):
        pass

# Hardware peak numbers, for MFU (flops) and MBU (memory bandwidth) reporting.
# Matching is by substrings of the lowercased device name; the first row whose
# substrings all appear wins, so the more specific rows come first.
def get_peak_flops(device_name: str) -> float:
    # dense bf16 peak flops/s of a GPU, looked up by name; inf if unknown (MFU then reads 0%)
    name = device_name.lower()

    _PEAK_FLOPS_TABLE = (
        # NVIDIA Blackwell
        (["gb200"], 2.5e15),
        (["grace blackwell"], 2.5e15),
        (["b200"], 2.25e15),
        (["b100"], 1.8e15),
        # NVIDIA Hopper
        (["h200", "nvl"], 836e12),
        (["h200", "pcie"], 836e12),
        (["h200"], 989e12),
        (["h100", "nvl"], 835e12),
        (["h100", "pcie"], 756e12),
        (["h100"], 989e12),
        (["h800", "nvl"], 989e12),
        (["h800"], 756e12),
        # NVIDIA Ampere (data center)
        (["a100"], 312e12),
        (["a800"], 312e12),
        (["a40"], 149.7e12),
        (["a30"], 165e12),
        # NVIDIA Ada (data center)
        (["l40s"], 362e12),
        (["l40-s"], 362e12),
        (["l40 s"], 362e12),
        (["l4"], 121e12),
        # AMD Instinct
        (["mi355"], 2.5e15),
        (["mi325"], 1.3074e15),
        (["mi300x"], 1.3074e15),
        (["mi300a"], 980.6e12),
        (["mi250x"], 383e12),
        (["mi250"], 362.1e12),
        # consumer GeForce
        (["5090"], 209.5e12),
        (["4090"], 165.2e12),
        (["3090"], 71e12),
    )
    for patterns, flops in _PEAK_FLOPS_TABLE:
        if all(p in name for p in patterns):
            return flops
    if "data center gpu max 1550" in name:
        # Intel Ponte Vecchio: the peak scales with the number of compute units
        max_comp_units = torch.xpu.get_device_properties("xpu").max_compute_units
        return 512 * max_comp_units * 1300 * 10**6

    # better an obviously-zero MFU than a wrong guess
    logger.warning(f"Peak flops undefined for: {device_name}, MFU will show as 0%")
    return float('inf')

def get_peak_bandwidth(device_name: str) -> float:
    """Peak device-memory bandwidth in bytes/s, looked up by name; inf if unknown.
    Decoding is bandwidth-bound, so this is the roofline used for MBU."""
    name = device_name.lower()

    _PEAK_BANDWIDTH_TABLE = (
        # NVIDIA Blackwell
        (["gb200"], 8.0e12),
        (["grace blackwell"], 8.0e12),
        (["b200"], 8.0e12),
        (["b100"], 8.0e12),
        # NVIDIA Hopper
        (["h200"], 4.8e12),
        (["h100", "nvl"], 3.9e12),
        (["h100", "pcie"], 2.0e12),
        (["h100"], 3.35e12),  # SXM
        (["h800", "pcie"], 2.0e12),
        (["h800"], 3.35e12),  # SXM
        # NVIDIA Ampere (data center); A100 figure is the 80GB part
        (["a100"], 2.0e12),
        (["a800"], 2.0e12),
        (["a40"], 696e9),
        (["a30"], 933e9),
        # NVIDIA Ada (data center)
        (["l40s"], 864e9),
        (["l40-s"], 864e9),
        (["l40 s"], 864e9),
        (["l4"], 300e9),
        # AMD Instinct
        (["mi355"], 8.0e12),
        (["mi325"], 6.0e12),
        (["mi300x"], 5.3e12),
        (["mi300a"], 5.3e12),
        (["mi250x"], 3.28e12),
        (["mi250"], 3.28e12),
        # consumer GeForce
        (["5090"], 1.79e12),
        (["4090"], 1.01e12),
        (["3090"], 936e9),
    )
    for patterns, bandwidth in _PEAK_BANDWIDTH_TABLE:
        if all(p in name for p in patterns):
            return bandwidth

    logger.warning(f"Peak bandwidth undefined for: {device_name}, MBU will show as 0%")
    return float('inf')

# -----------------------------------------------------------------------------
# Ours: progress of a long stage (upstream prints nothing in these places)


def format_seconds(seconds):
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """
    One progress bar for a stage: done/total, rate and ETA. On a terminal it redraws one line
    in place; otherwise (a log file, a pipe) it writes the same bar as a plain line when a
    quarter of the work is done, so a log gets at most four lines and no control characters.
    Prints on rank 0 only.

        progress = Progress(40, "bpb val", unit="batches")
        for batch in progress.wrap(batches): ...
    """

    def __init__(self, total, desc, unit="it", stream=None, clock=time.monotonic):
        self.total, self.desc, self.unit = max(int(total), 1), desc, unit
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = int(os.environ.get("RANK", 0)) == 0
        self.interactive = self.enabled and bool(getattr(self.stream, "isatty", None) and self.stream.isatty())
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.quarters_shown = 0
        self.closed = False

    def line(self):
        elapsed = self.clock() - self.start
        frac = min(self.done / self.total, 1.0)
        filled = int(20 * frac)
        bar = "#" * filled + "." * (20 - filled)
        text = f"{self.desc}: [{bar}] {self.done}/{self.total} {self.unit}"
        if self.done and elapsed > 0:
            text += f" | {self.done / elapsed:.2f} {self.unit}/s"
        if self.done >= self.total:
            text += f" | done in {format_seconds(elapsed)}"
        elif self.done:
            text += f" | eta {format_seconds(elapsed * (self.total - self.done) / self.done)}"
        return text

    def update(self, n=1):
        self.done = min(self.done + n, self.total)
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r" + self.line() + "\x1b[K")  # redraw and clear what is left of the old line
            if self.done >= self.total:
                self.stream.write("\n")
                self.closed = True
            self.stream.flush()
            return
        quarters = 4 * self.done // self.total
        if quarters > self.quarters_shown:
            self.quarters_shown = quarters
            print(self.line(), file=self.stream, flush=True)
            self.closed = self.done >= self.total

    def close(self):
        """End the bar (also when the work stopped early): a terminal gets its newline."""
        if self.enabled and not self.closed:
            self.closed = True
            if self.interactive:
                self.stream.write("\n")
                self.stream.flush()
            elif self.done < self.total:
                print(self.line() + " (stopped)", file=self.stream, flush=True)

    def wrap(self, iterable, limit=None):
        """Yield from iterable, counting each item as it is handed out (a consumer that takes
        exactly `total` items never asks for one more, so counting after it would miss the
        last); stop after `limit` items (default total)."""
        limit = self.total if limit is None else limit
        for i, item in enumerate(iterable):
            if i >= limit:
                break
            self.update()
            yield item
