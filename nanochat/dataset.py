"""
The pretraining corpus: ClimbMix-400B, stored as numbered parquet shards with one
'text' column, read one row group at a time.

This module knows where the shards live on the internet and on disk, lists them,
iterates over their documents, and downloads them (run it as a script):

    python -m nanochat.dataset -n 8      # 8 train shards + the validation shard

The last shard on disk is always the validation split; everything before it is train.
"""

import os
import time
import argparse
import tempfile
from concurrent.futures import ThreadPoolExecutor

import requests
import pyarrow.parquet as pq
from tqdm import tqdm

from nanochat.common import get_base_dir

# -----------------------------------------------------------------------------
# Where the current dataset lives

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542  # shards are numbered 0..6542; number 6542 is held out as validation
index_to_filename = lambda index: f"shard_{index:05d}.parquet"
DATA_DIR = os.path.join(get_base_dir(), "base_data_climbmix")

# How the downloader behaves (module-level so tests and impatient users can tune them)
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_BACKOFF_S = 2  # wait DOWNLOAD_BACKOFF_S ** attempt seconds before retrying
DOWNLOAD_TIMEOUT_S = 30

# DATA_DIR is fixed at import, but NANOCHAT_BASE_DIR may change afterwards (tests,
# notebooks). Unless someone has assigned DATA_DIR explicitly, follow the base dir.
_IMPORT_TIME_DATA_DIR = DATA_DIR
_DOWNLOAD_HINT = "download shards with `python -m nanochat.dataset -n 8`"


def _data_dir():
    if DATA_DIR != _IMPORT_TIME_DATA_DIR:
        return DATA_DIR
    return os.path.join(get_base_dir(), "base_data_climbmix")


def _print_legacy_warning(missing_dir):
    bar = "=" * 80
    print(f"\n{bar}")
    print("  WARNING: the pretraining dataset has changed (FinewebEdu-100B -> ClimbMix-400B)")
    print(bar)
    print(f"\n  There is no ClimbMix data at {missing_dir}.")
    print("  To switch to the new dataset, download it and retrain the tokenizer:\n")
    print("    python -m nanochat.dataset -n 170     # ~170 shards is enough for a GPT-2 class model")
    print("    python -m scripts.tok_train")
    print("\n  Until then we fall back to the old FinewebEdu-100B shards, if present.")
    print(f"{bar}\n")

# -----------------------------------------------------------------------------
# Reading


def list_parquet_files(data_dir=None, warn_on_legacy=False):
    """Sorted full paths of the finished .parquet shards in data_dir (default: DATA_DIR).
    If the ClimbMix dir does not exist we fall back to the legacy FinewebEdu dir
    (base_data), optionally printing a warning about it."""
    if data_dir is None:
        data_dir = _data_dir()
    if not os.path.isdir(data_dir):
        if warn_on_legacy:
            _print_legacy_warning(data_dir)
        legacy_dir = os.path.join(get_base_dir(), "base_data")
        if not os.path.isdir(legacy_dir):
            raise FileNotFoundError(f"No pretraining data directory at {data_dir}; {_DOWNLOAD_HINT}")
        data_dir = legacy_dir
    # half-downloaded shards carry a .tmp suffix and must never be read
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet"))
    return [os.path.join(data_dir, n) for n in names]


def split_parquet_files(split, warn_on_legacy=False):
    """The shards of one split: 'val' is the last shard, 'train' is all the others.
    Raises a one-line error saying what to download if the split would be empty."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    paths = list_parquet_files(warn_on_legacy=warn_on_legacy)
    if not paths:
        raise FileNotFoundError(f"No pretraining shards (*.parquet) found in {_data_dir()}; {_DOWNLOAD_HINT}")
    if split == "train" and len(paths) == 1:
        raise FileNotFoundError(f"Only one shard found in {os.path.dirname(paths[0])} and the last shard "
                                f"is reserved for validation, so there is no train data; {_DOWNLOAD_HINT}")
    return paths[:-1] if split == "train" else paths[-1:]


def parquets_iter_batched(split, start=0, step=1):
    """Yield the documents of a split one row group at a time (a list of strings per yield).
    Within every shard only row groups start, start+step, ... are read, which is how
    DDP ranks split the data (start=rank, step=world_size)."""
    for path in split_parquet_files(split):
        pf = pq.ParquetFile(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg_idx).column("text").to_pylist()

# -----------------------------------------------------------------------------
# Downloading


def _looks_like_parquet(path):
    # a parquet file begins and ends with the magic bytes PAR1; an HTML error page does not
    if os.path.getsize(path) < 8:
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        tail = f.read(4)
    return head == b"PAR1" and tail == b"PAR1"


def download_single_file(index, data_dir=None, base_url=None, verbose=True):
    """Download shard `index` into the data dir, retrying with exponential backoff.
    Bytes go to a temporary file that is renamed into place only once complete, so an
    interrupted download never leaves a partial shard behind. Returns True on success
    (or if the shard is already there), False after the last failed attempt."""
    data_dir = _data_dir() if data_dir is None else data_dir
    base_url = BASE_URL if base_url is None else base_url
    filename = index_to_filename(index)
    filepath = os.path.join(data_dir, filename)
    if os.path.exists(filepath):
        if verbose:
            print(f"Skipping {filepath} (already exists)")
        return True
    os.makedirs(data_dir, exist_ok=True)
    url = f"{base_url}/{filename}"
    if verbose:
        print(f"Downloading {filename}...")

    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        tmp_path = None
        try:
            with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
                response.raise_for_status()
                # a unique temp name: two concurrent downloaders never write the same file
                fd, tmp_path = tempfile.mkstemp(dir=data_dir, prefix=f"{filename}.", suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1024 * 1024):
                        f.write(chunk)
            if not _looks_like_parquet(tmp_path):
                raise IOError(f"{url} did not return a parquet file")
            os.replace(tmp_path, filepath)  # atomic on POSIX and Windows
            if verbose:
                print(f"Successfully downloaded {filename}")
            return True
        except (requests.RequestException, OSError) as e:
            print(f"Attempt {attempt}/{DOWNLOAD_ATTEMPTS} failed for {filename}: {e}")
            if tmp_path is not None and os.path.exists(tmp_path):
                os.remove(tmp_path)
            if attempt < DOWNLOAD_ATTEMPTS:
                wait_s = DOWNLOAD_BACKOFF_S ** attempt
                print(f"Waiting {wait_s} seconds before retry...")
                time.sleep(wait_s)
    print(f"Failed to download {filename} after {DOWNLOAD_ATTEMPTS} attempts")
    return False


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download pretraining dataset shards")
    parser.add_argument("-n", "--num-files", type=int, default=-1, help="Number of train shards to download (default: -1), -1 = disable")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="Number of parallel download workers (default: 4)")
    args = parser.parse_args(argv)
    if args.num_files < -1:
        parser.error(f"--num-files must be -1 (all shards) or >= 0, got {args.num_files}")
    if args.num_workers < 1:
        parser.error(f"--num-workers must be >= 1, got {args.num_workers}")

    data_dir = _data_dir()
    os.makedirs(data_dir, exist_ok=True)
    # -n counts train shards; the validation shard (the last one) always comes along
    num_train = MAX_SHARD if args.num_files == -1 else min(args.num_files, MAX_SHARD)
    indices = list(range(num_train)) + [MAX_SHARD]
    print(f"Downloading {len(indices)} shards using {args.num_workers} workers...")
    print(f"Target directory: {data_dir}")
    print()

    # Downloads are network/disk bound, so threads parallelise them as well as processes
    # would; the bar replaces the per-file chatter (failures are still printed).
    fetch = lambda index: download_single_file(index, data_dir=data_dir, base_url=BASE_URL, verbose=False)
    with ThreadPoolExecutor(max_workers=args.num_workers) as pool:
        results = list(tqdm(pool.map(fetch, indices), total=len(indices), desc="shards", unit="shard"))
    successful = sum(results)
    print(f"Done! Downloaded: {successful}/{len(indices)} shards to {data_dir}")
    return 0 if successful == len(indices) else 1


if __name__ == "__main__":
    raise SystemExit(main())
