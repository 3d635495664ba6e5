"""
Write pretraining shards from text that is already on this machine, for offline runs.

    python -m scripts.offline_data                     # CPython's docs and docstrings
    python -m scripts.offline_data --input notes/ -n 4  # your own .txt/.md files

The shards land where nanochat.dataset keeps downloaded ones
($NANOCHAT_BASE_DIR/base_data_climbmix/shard_XXXXX.parquet), in the same format: one string
column `text`, several row groups per file, the last file being the validation split. So
every later step (tok_train, base_train, base_eval) runs unchanged. Used by the CPU preset
of speedrun.sh; GPU runs download the real ClimbMix shards with `python -m nanochat.dataset`.
"""

import os
import ast
import sys
import random
import argparse
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir


def python_docs():
    """Documents that ship with CPython: pydoc's topic pages and long stdlib docstrings."""
    import pydoc_data.topics
    for name in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[name].strip()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately odd; skipping them loses nothing
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield doc


def text_files(root):
    """One document per paragraph block of each UTF-8 text file under root."""
    paths = [Path(root)] if Path(root).is_file() else sorted(p for p in Path(root).rglob("*") if p.is_file())
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            print(f"skipping {path}: not UTF-8 text", file=sys.stderr)
            continue
        for block in text.split("\n\n\n"):
            if block.strip():
                yield block.strip()


def write_shards(docs, out_dir, num_shards, docs_per_row_group=64, seed=0):
    """Shuffle docs, split them over num_shards files (last = val); write temp then rename."""
    if num_shards < 2:
        raise ValueError("need at least 2 shards (the last one is the validation split)")
    docs = list(docs)
    if len(docs) < num_shards:
        raise ValueError(f"only {len(docs)} documents found, too few for {num_shards} shards")
    random.Random(seed).shuffle(docs)
    os.makedirs(out_dir, exist_ok=True)
    per_shard = len(docs) // num_shards
    paths = []
    for i in range(num_shards):
        chunk = docs[i * per_shard:(i + 1) * per_shard] if i < num_shards - 1 else docs[i * per_shard:]
        path = os.path.join(out_dir, f"shard_{i:05d}.parquet")
        table = pa.table({"text": pa.array(chunk, type=pa.string())})
        pq.write_table(table, path + ".tmp", row_group_size=docs_per_row_group)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description="Write pretraining shards from local text (offline)")
    parser.add_argument("--input", type=str, default=None, help="file or directory of UTF-8 text (default: CPython's bundled docs)")
    parser.add_argument("-n", "--num-shards", type=int, default=4, help="number of shards; the last is the val split")
    parser.add_argument("--out-dir", type=str, default=None, help="default: $NANOCHAT_BASE_DIR/base_data_climbmix")
    args = parser.parse_args()
    out_dir = args.out_dir or os.path.join(get_base_dir(), "base_data_climbmix")
    docs = text_files(args.input) if args.input else python_docs()
    try:
        paths = write_shards(docs, out_dir, args.num_shards)
    except ValueError as e:
        sys.exit(f"error: {e}")
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    print(f"wrote {len(paths)} shards ({total:,} documents) to {out_dir}")


if __name__ == "__main__":
    main()
