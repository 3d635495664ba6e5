"""
Build a MegaContext Tree from text files: tokenize, gist, store.

    python -m megacontext.ingest --config CONFIG.yaml --input FILE_OR_DIR --out TREE_DIR
    python -m megacontext.ingest --config CONFIG.yaml --input more.txt --out TREE_DIR --append

Flags:
    --config PATH    YAML config (keys below)
    --input PATH     a text file, or a directory: every file under it matching --glob, in
                     sorted path order (hidden files and directories are skipped)
    --out DIR        the tree directory (LOD0/1/2.ctx + tree.json); must not hold a tree yet
    --append         continue the tree in --out instead (same base model and GistNet only)
    --encoding ENC   text encoding of the input files (default utf-8)
    --glob PATTERN   which files of an input directory to read (default: all, recursively)
    --no-bos         do not start each file with the tokenizer's BOS token (default: do, as
                     nanochat does for every document)

Config keys (a flat YAML mapping; a training config with these keys works as is):
    source: base            checkpoint family: base | sft | rl (under NANOCHAT_BASE_DIR)
    model_tag: d20          default: the largest model of that source
    step: 5000              default: the last step
    checkpoint_dir: PATH    instead of source/model_tag: a directory of model_<step>.pt files
    gistnet: mean           'mean' (mean-pool baseline, no training needed) or the path of a
                            GistNet checkpoint: a torch file holding {"config": GistNetConfig
                            fields, "state_dict": weights}, possibly under a "gistnet" key
    dtype: fp16             gist dtype on disk: fp16 | bf16
    batch_size: 256         blocks of 32 tokens gisted per GistNet call
    device_type: cpu        cuda | cpu | mps (default: autodetect)
    model_name: d20         name recorded in the tree (default: "<source>:<tag>@<step>")

Files are tokenized in pieces of about 1 MiB, cut where a line ends and the next one starts
with a non-space character: no token of nanochat's split pattern spans such a point, so
the ids are those of tokenizing the whole file at once while memory stays flat.

Errors are reported as one line (exit status 1) before anything is written: an input
that is not valid text in --encoding (naming the file and byte offset), empty input, a
missing checkpoint or GistNet file, an --out that already holds a tree (or, with --append,
one made for another base model or GistNet). An existing tree is never overwritten; an
interrupted run leaves every committed block in place.
"""

import argparse
import codecs
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

# nanochat's model stack (and megacontext.gistnet, which builds on it) is imported only once the
# inputs have been checked: it takes seconds to import, and bad input should be reported at once.
from megacontext.storage import LEVEL_FILENAMES, CtxFormatError
from megacontext.tree import META_FILENAME, MegaContextTree

CHUNK_BYTES = 1 << 20      # bytes of text tokenized per tokenizer call
_MAX_PIECE_CHARS = 8 << 20  # a file without any safe cut point is cut here regardless
CONFIG_KEYS = {"source", "model_tag", "step", "checkpoint_dir", "gistnet", "dtype", "batch_size",
               "device_type", "model_name"}

# -----------------------------------------------------------------------------
# config


def load_config(path):
    """The ingest settings from a YAML file, with defaults filled in and types checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a YAML mapping of keys ({', '.join(sorted(CONFIG_KEYS))})")
    cfg = {"source": "base", "model_tag": None, "step": None, "checkpoint_dir": None, "gistnet": None,
           "dtype": "fp16", "batch_size": 256, "device_type": "", "model_name": None}
    cfg.update({k: v for k, v in raw.items() if k in CONFIG_KEYS})  # other keys belong to other tools
    if cfg["gistnet"] is None:
        raise ValueError(f"config {path} has no 'gistnet' key: set `gistnet: mean` for the mean-pool "
                         f"baseline, or the path of a trained GistNet checkpoint")
    if cfg["source"] not in ("base", "sft", "rl"):
        raise ValueError(f"config {path}: source must be base, sft or rl, got {cfg['source']!r}")
    if cfg["dtype"] not in ("fp16", "bf16"):
        raise ValueError(f"config {path}: dtype must be fp16 or bf16, got {cfg['dtype']!r}")
    if not isinstance(cfg["batch_size"], int) or cfg["batch_size"] < 1:
        raise ValueError(f"config {path}: batch_size must be a positive integer, got {cfg['batch_size']!r}")
    if cfg["step"] is not None and not isinstance(cfg["step"], int):
        raise ValueError(f"config {path}: step must be an integer, got {cfg['step']!r}")
    return cfg


# -----------------------------------------------------------------------------
# inputs


def list_inputs(path, pattern="*"):
    """The files to read: the file itself, or the matching non-hidden files under a directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(p for p in path.rglob(pattern)
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"input directory {path} has no files matching {pattern!r}; nothing to ingest")
    return files


def check_texts(files, encoding):
    """Decode every file once before anything is written. Returns the total size in bytes;
    raises ValueError naming the first file that is not valid text, or if all are empty."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r}; pass --encoding with a Python codec name "
                         f"(utf-8, latin-1, cp1252, ...)") from None
    total = 0
    for path in files:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        offset = 0
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                held = len(decoder.getstate()[0])  # bytes of a character split across chunks
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    at = offset - held + e.start
                    raise ValueError(f"{path} is not valid {encoding} text (byte 0x{e.object[e.start]:02X} at "
                                     f"offset {at}); pass --encoding (e.g. --encoding latin-1) if it is "
                                     f"another encoding") from None
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(f"{path} is not valid {encoding} text: it ends inside a character; "
                                 f"pass --encoding if it is another encoding") from None
        total += offset
    if total == 0:
        names = files[0] if len(files) == 1 else f"all {len(files)} input files"
        raise ValueError(f"{names} {'is' if len(files) == 1 else 'are'} empty; nothing to ingest")
    return total


def _safe_cut(text):
    """Index at which `text` can be split without changing its tokenization: just after a
    newline that is followed by a non-space character (0 if there is none)."""
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i < 0:
            return 0
        if not text[i + 1].isspace():
            return i + 1


def read_pieces(path, encoding, chunk_bytes=CHUNK_BYTES):
    """Yield (text piece, bytes read so far) for a file, in pieces cut at safe points."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    buf, done = "", 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            done += len(chunk)
            buf += decoder.decode(chunk)
            cut = _safe_cut(buf)
            if cut == 0 and len(buf) > _MAX_PIECE_CHARS:
                cut = buf.rfind("\n") + 1 or len(buf)
            if cut:
                yield buf[:cut], done
                buf = buf[cut:]
        buf += decoder.decode(b"", final=True)
    if buf:
        yield buf, done


# -----------------------------------------------------------------------------
# model and gister


# where each checkpoint source lives under the base dir (nanochat's layout)
_SOURCE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def load_base_model(cfg, device):
    """(model, tokenizer, model_name) for the checkpoint the config names. The tag and step
    are resolved first, so the recorded name is the same on every run for one checkpoint."""
    from nanochat.checkpoint_manager import build_model, find_largest_model, find_last_step
    from nanochat.common import get_base_dir
    if cfg["checkpoint_dir"]:
        checkpoint_dir = Path(cfg["checkpoint_dir"])
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir} does not exist")
        label = checkpoint_dir.name
    else:
        checkpoints = os.path.join(get_base_dir(), _SOURCE_DIRS[cfg["source"]])
        tag = cfg["model_tag"] or find_largest_model(checkpoints)
        checkpoint_dir = Path(checkpoints) / tag
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"no {cfg['source']} checkpoint with model_tag {tag!r} ({checkpoint_dir} "
                                    f"does not exist); check model_tag or NANOCHAT_BASE_DIR")
        label = f"{cfg['source']}:{tag}"
    step = cfg["step"] if cfg["step"] is not None else find_last_step(str(checkpoint_dir))
    model, tokenizer, _ = build_model(str(checkpoint_dir), step, device, phase="eval")
    return model, tokenizer, cfg["model_name"] or _short_name(f"{label}@{step}")


def _short_name(name):
    """Names longer than the .ctx header's 31 bytes keep their start plus a hash of the whole."""
    if len(name.encode("utf-8")) <= 31:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return name.encode("utf-8")[:22].decode("utf-8", errors="ignore") + "~" + digest


def load_gister(spec, n_embd, device):
    """The GistNet the config names: 'mean' or a checkpoint path."""
    from megacontext.gistnet import GistNet, GistNetConfig
    if spec == "mean":
        gistnet = GistNet(GistNetConfig(n_embd=n_embd, head="mean"))
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GistNet checkpoint {path} does not exist; train one, or set `gistnet: mean`")
        data = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(data, dict) and "gistnet" in data:
            data = data["gistnet"]
        if not (isinstance(data, dict) and "config" in data and "state_dict" in data):
            raise ValueError(f"{path} is not a GistNet checkpoint: expected a dict with 'config' and "
                             f"'state_dict' (optionally under 'gistnet')")
        gistnet = GistNet(GistNetConfig(**data["config"]))
        if gistnet.config.n_embd != n_embd:
            raise ValueError(f"GistNet {path} has n_embd={gistnet.config.n_embd} but the base model has "
                             f"{n_embd}; it was trained for another model")
        gistnet.load_state_dict(data["state_dict"], strict=True)
    return gistnet.to(device).eval()


# -----------------------------------------------------------------------------
# main


def build_parser():
    parser = argparse.ArgumentParser(description="Build a MegaContext Tree (LOD0/1/2.ctx) from text files")
    parser.add_argument("--config", type=str, required=True, help="YAML config: base model, gistnet, dtype, batch_size")
    parser.add_argument("--input", type=str, required=True, help="a text file or a directory of text files")
    parser.add_argument("--out", type=str, required=True, help="tree directory to create (or continue with --append)")
    parser.add_argument("--append", action="store_true", help="continue an existing tree of the same model and GistNet")
    parser.add_argument("--encoding", type=str, default="utf-8", help="text encoding of the input files")
    parser.add_argument("--glob", type=str, default="*", help="files of an input directory to read (recursive)")
    parser.add_argument("--no-bos", action="store_true", help="do not start each file with the BOS token")
    return parser


def _has_tree(out):
    return any((out / name).exists() for name in (*LEVEL_FILENAMES, META_FILENAME))


def run(args):
    """Build or extend the tree; returns a dict of what was done."""
    cfg = load_config(args.config)
    files = list_inputs(args.input, args.glob)
    total_bytes = check_texts(files, args.encoding)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory for the tree")
    if _has_tree(out) and not args.append:
        raise ValueError(f"{out} already holds a MegaContext tree; pass --append to continue it "
                         f"(same model and GistNet), or choose another --out")
    if args.append and not _has_tree(out):
        raise ValueError(f"--append: {out} holds no MegaContext tree to continue; drop --append to create one")

    from nanochat.common import autodetect_device_type
    from megacontext.gistnet import token_embeddings
    device = torch.device(cfg["device_type"] or autodetect_device_type())
    model, tokenizer, model_name = load_base_model(cfg, device)
    gistnet = load_gister(cfg["gistnet"], model.config.n_embd, device)
    identity = gistnet.identity()

    embed_fn = lambda ids: token_embeddings(model, ids)
    tree_kw = dict(embed_fn=embed_fn, gist_fn=gistnet, durable=False, batch_blocks=cfg["batch_size"], device=device)
    if args.append:
        try:
            tree = MegaContextTree.open(out, expect_model_name=model_name, expect_gistnet=identity, **tree_kw)
        except ValueError as e:
            raise ValueError(f"refusing to append: {e}") from None
    else:
        tree = MegaContextTree.create(out, model_name, model.config.n_embd, identity, dtype=cfg["dtype"], **tree_kw)

    bos = tokenizer.get_bos_token_id()
    start_tokens, t0 = tree.num_tokens, time.time()
    with tree, tqdm(total=total_bytes, unit="B", unit_scale=True, desc="ingest", file=sys.stderr) as bar:
        for path in files:
            bar.set_postfix_str(path.name, refresh=False)
            if not args.no_bos:
                tree.ingest([bos])
            seen = 0
            for text, done in read_pieces(path, args.encoding):
                tree.ingest(np.asarray(tokenizer.encode(text), dtype=np.int64))
                bar.update(done - seen)
                seen = done
                rate = (tree.num_tokens - start_tokens) / max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{path.name}, {rate:,.0f} tok/s", refresh=False)
        summary = {"out": str(out), "files": len(files), "tokens_added": tree.num_tokens - start_tokens,
                   "tokens": tree.num_tokens, "lod1_gists": tree.num_gists(1), "lod2_gists": tree.num_gists(2),
                   "pending_tokens": tree.pending_tokens, "model_name": model_name, "gistnet": identity,
                   "seconds": time.time() - t0}
    summary["tokens_per_s"] = summary["tokens_added"] / max(summary["seconds"], 1e-9)
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        s = run(args)
    except (ValueError, OSError, RuntimeError, CtxFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} keeps every whole block committed so far "
              f"(see `python -m megacontext.inspect {args.out}`)", file=sys.stderr)
        return 130
    print(f"{s['out']}: +{s['tokens_added']:,} tokens from {s['files']} file(s) in {s['seconds']:.1f}s "
          f"({s['tokens_per_s']:,.0f} tok/s); tree holds {s['tokens']:,} tokens, {s['lod1_gists']:,} LOD1 and "
          f"{s['lod2_gists']:,} LOD2 gists ({s['pending_tokens']} tokens pending in the last block); "
          f"model {s['model_name']!r}, {s['gistnet']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
