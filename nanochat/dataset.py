"""
The pretraining corpus: ClimbMix-400B, stored as numbered parquet shards with one
'text' column, read one row group at a time.

This module knows where the shards live on the internet and on disk, lists them,
iterates over their documents, and downloads them (run it as a script):

    python -m nanochat.dataset -n 8      # 8 train shards + the validation shard

The last shard on disk is always the validation split; everything before it is train.

Ours beside upstream's (grouped at the end of each section, marked `ours:`): the data dir
follows NANOCHAT_BASE_DIR when it changes after import; a missing or empty split is one
FileNotFoundError naming the download command; the downloader is testable (data_dir,
base_url, verbose; module-level retry knobs), writes a unique temp file, refuses a file
that is not parquet, and `main` exits non-zero when a shard failed.
"""

import os
import argparse
import time
import requests
import pyarrow.parquet as pq
import tempfile
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from nanochat.common import get_base_dir

# -----------------------------------------------------------------------------
# Where the current dataset lives

BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542 # shards are numbered 0..6542; number 6542 is held out as validation
index_to_filename = lambda index: f"shard_{index:05d}.parquet"
base_dir = get_base_dir()
DATA_DIR = os.path.join(base_dir, "base_data_climbmix")

# ours: how the downloader behaves (module-level so tests and impatient users can tune them)
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_BACKOFF_S = 2  # wait DOWNLOAD_BACKOFF_S ** attempt seconds before retrying
DOWNLOAD_TIMEOUT_S = 30

# ours: DATA_DIR is fixed at import, but NANOCHAT_BASE_DIR may change afterwards (tests,
# notebooks). Unless someone has assigned DATA_DIR explicitly, follow the base dir.
_IMPORT_TIME_DATA_DIR = DATA_DIR
_DOWNLOAD_HINT = "download shards with `python -m nanochat.dataset -n 8`"

# -----------------------------------------------------------------------------
# Reading: what other modules import

def list_parquet_files(data_dir=None, warn_on_legacy=False):
    """Sorted full paths of the finished .parquet shards in data_dir (default: DATA_DIR).
    If the ClimbMix dir does not exist we fall back to the legacy FinewebEdu dir
    (base_data), optionally printing a warning about it."""
    data_dir = _data_dir() if data_dir is None else data_dir

    # the dataset moved from FinewebEdu-100B to ClimbMix-400B; old base dirs still work for now
    if not os.path.exists(data_dir):
        requested_dir = data_dir  # ours: named in the error below
        if warn_on_legacy:
            bar = "=" * 80
            print()
            print(bar)
            print("  WARNING: the pretraining dataset has changed (FinewebEdu-100B -> ClimbMix-400B)")
            print(bar)
            print()
            print(f"  There is no ClimbMix data at {data_dir}.")
            print("  To switch to the new dataset, download it and retrain the tokenizer:")
            print()
            print("    python -m nanochat.dataset -n 170     # ~170 shards is enough for a GPT-2 class model")
            print("    python -m scripts.tok_train")
            print()
            print("  Until then we fall back to the old FinewebEdu-100B shards, if present.")
            print(bar)
            print()
        data_dir = os.path.join(get_base_dir(), "base_data")
        if not os.path.isdir(data_dir):  # ours: one line naming the download command
            raise FileNotFoundError(f"No pretraining data directory at {requested_dir}; {_DOWNLOAD_HINT}")

    # half-downloaded shards carry a .tmp suffix and must never be read
    parquet_files = sorted([
        f for f in os.listdir(data_dir)
        if f.endswith('.parquet') and not f.endswith('.tmp')
    ])
    parquet_paths = [os.path.join(data_dir, f) for f in parquet_files]
    return parquet_paths

def parquets_iter_batched(split, start=0, step=1):
    """Yield the documents of a split one row group at a time (a list of strings per yield).
    'val' is the last shard, 'train' all the others. Within every shard only row groups
    start, start+step, ... are read, which is how DDP ranks split the data
    (start=rank, step=world_size)."""
    parquet_paths = split_parquet_files(split)  # ours: one-line errors, same split
    for filepath in parquet_paths:
        pf = pq.ParquetFile(filepath)
        for rg_idx in range(start, pf.num_row_groups, step):
            rg = pf.read_row_group(rg_idx)
            texts = rg.column('text').to_pylist()
            yield texts

# ours: the split, and the data dir, with clear errors

def split_parquet_files(split, warn_on_legacy=False):
    """The shards of one split: 'val' is the last shard, 'train' is all the others.
    Raises a one-line error saying what to download if the split would be empty."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    parquet_paths = list_parquet_files(warn_on_legacy=warn_on_legacy)
    if not parquet_paths:
        raise FileNotFoundError(f"No pretraining shards (*.parquet) found in {_data_dir()}; {_DOWNLOAD_HINT}")
    if split == "train" and len(parquet_paths) == 1:
        raise FileNotFoundError(f"Only one shard found in {os.path.dirname(parquet_paths[0])} and the last shard "
                                f"is reserved for validation, so there is no train data; {_DOWNLOAD_HINT}")
    return parquet_paths[:-1] if split == "train" else parquet_paths[-1:]

def _data_dir():
    if DATA_DIR != _IMPORT_TIME_DATA_DIR:
        return DATA_DIR
    return os.path.join(get_base_dir(), "base_data_climbmix")

# -----------------------------------------------------------------------------
# Downloading

def download_single_file(index, data_dir=None, base_url=None, verbose=True):
    """Download shard `index` into the data dir, retrying with exponential backoff.
    Bytes go to a temporary file that is renamed into place only once complete, so an
    interrupted download never leaves a partial shard behind. Returns True on success
    (or if the shard is already there), False after the last failed attempt."""
    data_dir = _data_dir() if data_dir is None else data_dir  # ours: data_dir, base_url, verbose
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

    max_attempts = DOWNLOAD_ATTEMPTS
    for attempt in range(1, max_attempts + 1):
        temp_path = None
        try:
            with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
                response.raise_for_status()
                # ours: a unique temp name, so two concurrent downloaders never write the same file
                fd, temp_path = tempfile.mkstemp(dir=data_dir, prefix=f"{filename}.", suffix=".tmp")
                with os.fdopen(fd, 'wb') as f:
                    for chunk in response.iter_content(chunk_size=1024 * 1024):
                        f.write(chunk)
            if not _looks_like_parquet(temp_path):  # ours: an HTML error page served with 200
                raise IOError(f"{url} did not return a parquet file")
            os.replace(temp_path, filepath)  # atomic on POSIX and Windows
            if verbose:
                print(f"Successfully downloaded {filename}")
            return True

        except (requests.RequestException, IOError) as e:
            print(f"Attempt {attempt}/{max_attempts} failed for {filename}: {e}")
            if temp_path is not None and os.path.exists(temp_path):
                os.remove(temp_path)
            if attempt < max_attempts:
                wait_time = DOWNLOAD_BACKOFF_S ** attempt
                print(f"Waiting {wait_time} seconds before retry...")
                time.sleep(wait_time)
            else:
                print(f"Failed to download {filename} after {max_attempts} attempts")
                return False

    return False

def _looks_like_parquet(path):
    # ours: a parquet file begins and ends with the magic bytes PAR1; an HTML error page does not
    if os.path.getsize(path) < 8:
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        tail = f.read(4)
    return head == b"PAR1" and tail == b"PAR1"


def main(argv=None):
    # ours: a function (tests call it) that returns the exit status: non-zero if any shard failed
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
    num_train_shards = MAX_SHARD if args.num_files == -1 else min(args.num_files, MAX_SHARD)
    ids_to_download = list(range(num_train_shards))
    ids_to_download.append(MAX_SHARD)

    print(f"Downloading {len(ids_to_download)} shards using {args.num_workers} workers...")
    print(f"Target directory: {data_dir}")
    print()
    # ours: downloads are network/disk bound, so threads parallelise them as well as processes
    # would; the bar replaces the per-file chatter (failures are still printed)
    fetch = lambda index: download_single_file(index, data_dir=data_dir, base_url=BASE_URL, verbose=False)
    with ThreadPoolExecutor(max_workers=args.num_workers) as pool:
        results = list(tqdm(pool.map(fetch, ids_to_download), total=len(ids_to_download), desc="shards", unit="shard"))

    successful = sum(1 for success in results if success)
    print(f"Done! Downloaded: {successful}/{len(ids_to_download)} shards to {data_dir}")
    return 0 if successful == len(ids_to_download) else 1


if __name__ == "__main__":
    raise SystemExit(main())
