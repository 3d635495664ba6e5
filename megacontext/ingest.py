"""
Build a MegaContext Tree from text files: tokenize, gist, store. Resumable and idempotent.

    python -m megacontext.ingest --config CONFIG.yaml --input FILE_OR_DIR --out TREE_DIR
    python -m megacontext.ingest --config CONFIG.yaml --input more.txt --out TREE_DIR --append
    python -m megacontext.ingest --config CONFIG.yaml --out TREE_DIR --refresh

Flags (`--help` shows the defaults):
    --config PATH    YAML config (keys below)
    --input PATH     a text file, or a directory: every file under it matching --glob, in
                     sorted path order (hidden files and directories are skipped, and so are
                     binary files: a NUL byte in the first 8 KiB, e.g. __pycache__/*.pyc; the
                     summary says how many)
    --out DIR        the tree directory (LOD0/1/2.ctx + tree.json)
    --append         add the input to an existing tree (same base model and GistNet only)
    --refresh        regenerate every gist of the tree with the config's GistNet
    --encoding ENC   text encoding of the input files (default utf-8)
    --glob PATTERN   which files of an input directory to read (default: all, recursively)
    --no-bos         do not start each file with the tokenizer's BOS token (default: do, as
                     nanochat does for every document)

Config keys (a flat YAML mapping; any other key is an error naming it):
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

Resuming. The tree records every source (absolute path, size, SHA-256, BOS and encoding
settings) in tree.json before its first token and marks it whole after its last (see
megacontext/tree.py). Re-running the same command after a kill, a full disk or Ctrl-C
continues the interrupted source from its committed token (its text is tokenized again
and the committed prefix skipped, which gives the same ids) and then ingests the rest, so
the tree ends with exactly the input's tokens. Sources that are already whole are skipped
(all whole: a no-op that says so); with --append, new sources are added after them. The
hashes come from the read that checks the text, so they cost no extra pass.

Files are tokenized in pieces of about 1 MiB, cut where a line ends and the next one starts
with a non-space character: no token of nanochat's split pattern spans such a point, so
the ids are those of tokenizing the whole file at once while memory stays flat.

Errors are reported as one line (exit status 1) before anything is written: an input
that is not valid text in --encoding (naming the file and byte offset), empty input, a
missing checkpoint or GistNet file, a config key it does not know, an --out that holds a
tree built from other input (without --append), or one made for another base model or
GistNet (naming both GistNets with their ids, and the --refresh command that regenerates
the gists). An existing tree is never overwritten; an interrupted run leaves every
committed block in place.
"""

import argparse
import codecs
import difflib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

# torch, nanochat's model stack and megacontext.gistnet are imported only once the flags and the
# inputs have been checked: they take seconds to import, and bad input should be reported at once.
from megacontext.storage import LEVEL_FILENAMES, CtxFormatError, gistnet_id
META_FILENAME = "tree.json"  # megacontext.tree's (imported late: it needs torch); a test keeps them equal

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
    unknown = sorted(k for k in raw if k not in CONFIG_KEYS)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), CONFIG_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown config key '{unknown[0]}' in {path}{hint}; known keys: {', '.join(sorted(CONFIG_KEYS))}")
    cfg.update(raw)
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


BINARY_PROBE_BYTES = 8192  # a NUL byte in a file's first 8 KiB marks it binary (git's rule)


def _looks_binary(path):
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_PROBE_BYTES)


def list_inputs(path, pattern="*"):
    """(files to read, files skipped as binary): the file itself, or the matching non-hidden
    files under a directory in sorted path order, without binary ones (e.g. __pycache__/*.pyc)."""
    path = Path(path)
    if path.is_file():
        if _looks_binary(path):
            raise ValueError(f"{path} looks binary (a NUL byte in its first {BINARY_PROBE_BYTES} bytes); "
                             f"ingest reads text files")
        return [path], []
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    matched = sorted(p for p in path.rglob(pattern)
                     if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not matched:
        raise ValueError(f"input directory {path} has no files matching {pattern!r}; nothing to ingest")
    files, skipped = [], []
    for p in matched:
        (skipped if _looks_binary(p) else files).append(p)
    if not files:
        raise ValueError(f"input directory {path} has only binary files matching {pattern!r} ({len(skipped)}, "
                         f"e.g. {skipped[0].relative_to(path)}); nothing to ingest, choose text files with --glob")
    return files, skipped


def check_texts(files, encoding):
    """Decode every file once before anything is written. Returns (total size in bytes,
    [(size, sha256 hex) per file]): the same read gives each file's identity for resuming.
    Raises ValueError naming the first file that is not valid text, or if all are empty."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown text encoding {encoding!r}; pass --encoding with a Python codec name "
                         f"(utf-8, latin-1, cp1252, ...)") from None
    total, identities = 0, []
    for path in files:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        offset, sha256 = 0, hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                sha256.update(chunk)
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
        identities.append((offset, sha256.hexdigest()))
    if total == 0:
        names = files[0] if len(files) == 1 else f"all {len(files)} input files"
        raise ValueError(f"{names} {'is' if len(files) == 1 else 'are'} empty; nothing to ingest")
    return total, identities


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


def resolve_checkpoint(cfg):
    """(checkpoint dir, step, the name a tree records for it) for the checkpoint the config
    names (source, model_tag, step, optionally checkpoint_dir and model_name). The tag and step
    are resolved first, so the recorded name is the same on every run for one checkpoint."""
    from nanochat.checkpoint_manager import find_largest_model, find_last_step
    from nanochat.common import get_base_dir
    if cfg.get("checkpoint_dir"):
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
    return checkpoint_dir, step, cfg.get("model_name") or _short_name(f"{label}@{step}")


def load_base_model(cfg, device):
    """(model, tokenizer, model_name) for the checkpoint the config names (resolve_checkpoint)."""
    from nanochat.checkpoint_manager import build_model
    checkpoint_dir, step, model_name = resolve_checkpoint(cfg)
    model, tokenizer, _ = build_model(str(checkpoint_dir), step, device, phase="eval")
    return model, tokenizer, model_name


def _short_name(name):
    """Names longer than the .ctx header's 31 bytes keep their start plus a hash of the whole."""
    if len(name.encode("utf-8")) <= 31:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return name.encode("utf-8")[:22].decode("utf-8", errors="ignore") + "~" + digest


def load_gister(spec, n_embd, device):
    """The GistNet the config names: 'mean' or a checkpoint path."""
    import torch
    from megacontext.gistnet import GistNet, GistNetConfig
    if spec == "mean":
        gistnet = GistNet(GistNetConfig(n_embd=n_embd, head="mean"))
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GistNet checkpoint {path} does not exist; train one (e.g. `python -m nanochat.train "
                                    f"--config configs/gistnet_longctx_cpu.yaml`, which writes mc_XXXXXX.pt), or set "
                                    f"`gistnet: mean`")
        data = torch.load(path, map_location="cpu", weights_only=False)
        # a JT1 mc file says which levels it trained; identity() marks the others
        trained = data.get("trained_levels") if isinstance(data, dict) else None
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
        if trained is not None:
            gistnet.untrained_levels = tuple(lv for lv in (1, 2) if lv not in trained)
    return gistnet.to(device).eval()


# -----------------------------------------------------------------------------
# main


def build_parser():
    parser = argparse.ArgumentParser(description="Build a MegaContext Tree (LOD0/1/2.ctx) from text files; "
                                     "re-running the same command after a kill continues where it stopped",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=str, required=True, help="YAML config: base model, gistnet, dtype, batch_size")
    parser.add_argument("--input", type=str, default=None,
                        help="a text file or a directory of text files (binary files in a directory are skipped)")
    parser.add_argument("--out", type=str, required=True, help="tree directory to create (or continue with --append)")
    parser.add_argument("--append", action="store_true", help="add the input to an existing tree of the same model and GistNet")
    parser.add_argument("--refresh", action="store_true",
                        help="regenerate every gist of --out with the config's GistNet (no --input)")
    parser.add_argument("--encoding", type=str, default="utf-8", help="text encoding of the input files")
    parser.add_argument("--glob", type=str, default="*", help="files of an input directory to read (recursive)")
    parser.add_argument("--no-bos", action="store_true", help="do not start each file with the BOS token")
    return parser


def _has_tree(out):
    return any((out / name).exists() for name in (*LEVEL_FILENAMES, META_FILENAME))


def _recorded_sources(out):
    """The sources tree.json lists (read before the model loads, so a no-op or a refusal is instant)."""
    try:
        return json.loads((out / META_FILENAME).read_text()).get("sources", [])
    except (OSError, ValueError):
        return []  # no tree.json (yet) or a damaged one: opening the tree reports the latter


_SOURCE_KEY = ("path", "bytes", "sha256", "bos", "encoding")


def _same_source(a, b):
    return all(a.get(k) == b.get(k) for k in _SOURCE_KEY)


def plan_sources(out, identities, append, tree_exists):
    """For each input: 'whole' (already in the tree), 'resume' (the interrupted last source) or
    'new'. Raises ValueError when the command cannot continue this tree."""
    recorded = _recorded_sources(out) if tree_exists else []
    partial = recorded[-1] if recorded and recorded[-1].get("tokens") is None else None
    plan = []
    for ident in identities:
        matches = [r for r in recorded if _same_source(r, ident)]
        if matches and matches[-1] is partial:
            plan.append("resume")
        elif matches:
            plan.append("whole")
        else:
            plan.append("new")
    if partial is not None and "resume" not in plan:
        same_path = [i for i in identities if i["path"] == partial["path"]]
        why = (" (it has changed since: size or content differ)" if same_path else "")
        raise ValueError(f"{out} holds an unfinished ingest of {partial['path']}{why}; re-run the command that "
                         f"ingested it to finish it first, or ingest into another --out")
    if tree_exists and not append:
        foreign = [r for r in recorded if not any(_same_source(r, i) for i in identities)]
        if foreign or (not recorded and _tree_has_tokens(out)):
            what = f"other input ({foreign[0]['path']}, ...)" if foreign else "input this version did not record"
            raise ValueError(f"{out} already holds a MegaContext tree built from {what}; pass --append to add this "
                             f"input to it, or choose another --out")
    return plan


def _tree_has_tokens(out):
    from megacontext.storage import open_ctx
    try:
        with open_ctx(out / LEVEL_FILENAMES[0], verify=False) as lod0:
            return len(lod0) > 0
    except (OSError, CtxFormatError):
        return True  # unreadable: do not treat it as an empty tree that may be continued


def _gistnet_label(identity):
    return f"{identity} (id {gistnet_id(identity)}, 0x{gistnet_id(identity):08X})"


def _refresh_command(args):
    return f"python -m megacontext.ingest --config {args.config} --out {args.out} --refresh"


def run(args):
    """Build, continue or extend the tree; returns a dict of what was done."""
    cfg = load_config(args.config)
    out = Path(args.out)
    if args.refresh:
        return refresh(args, cfg, out)
    if args.input is None:
        raise ValueError("--input is required: a text file or a directory of text files (or pass --refresh)")
    files, skipped = list_inputs(args.input, args.glob)
    total_bytes, sizes_hashes = check_texts(files, args.encoding)
    identities = [{"path": str(path.resolve()), "bytes": size, "sha256": digest, "bos": not args.no_bos,
                   "encoding": args.encoding} for path, (size, digest) in zip(files, sizes_hashes)]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory for the tree")
    tree_exists = _has_tree(out)
    if args.append and not tree_exists:
        raise ValueError(f"--append: {out} holds no MegaContext tree to continue; drop --append to create one")
    plan = plan_sources(out, identities, args.append, tree_exists)
    summary = {"out": str(out), "files": len(files), "whole": plan.count("whole"), "resumed": plan.count("resume"),
               "new": plan.count("new"), "skipped": [str(p) for p in skipped], "tokens_added": 0}
    if all(action == "whole" for action in plan):
        summary.update(nothing_to_do=True)
        return summary

    import torch
    from nanochat.common import autodetect_device_type
    from megacontext.gistnet import token_embeddings
    from megacontext.tree import MegaContextTree
    device = torch.device(cfg["device_type"] or autodetect_device_type())
    model, tokenizer, model_name = load_base_model(cfg, device)
    gistnet = load_gister(cfg["gistnet"], model.config.n_embd, device)
    identity = gistnet.identity()

    embed_fn = lambda ids: token_embeddings(model, ids)
    tree_kw = dict(embed_fn=embed_fn, gist_fn=gistnet, durable=False, batch_blocks=cfg["batch_size"], device=device)
    if tree_exists:
        try:
            tree = MegaContextTree.open(out, expect_model_name=model_name, expect_gistnet=identity, **tree_kw)
        except ValueError as e:
            verb = "append" if args.append else "continue"
            raise ValueError(f"refusing to {verb}: {e}; to regenerate them with the config's GistNet "
                             f"{_gistnet_label(identity)} run `{_refresh_command(args)}`") from None
    else:
        tree = MegaContextTree.create(out, model_name, model.config.n_embd, identity, dtype=cfg["dtype"], **tree_kw)

    bos = tokenizer.get_bos_token_id()
    start_tokens, t0 = tree.num_tokens, time.time()
    # the interrupted source first (it is the tree's last one), then the new ones in input order
    order = [i for i, a in enumerate(plan) if a == "resume"] + [i for i, a in enumerate(plan) if a == "new"]
    todo_bytes = sum(identities[i]["bytes"] for i in order)
    with tree, tqdm(total=todo_bytes, unit="B", unit_scale=True, desc="ingest", file=sys.stderr) as bar:
        for i in order:
            path = files[i]
            if plan[i] == "resume":
                skip = tree.num_tokens - tree.sources[-1]["start"]  # committed tokens of this source
                summary["resumed_at"] = {"path": str(path), "tokens": skip}
            else:
                tree.begin_source(identities[i])
                skip = 0
            bar.set_postfix_str(path.name, refresh=False)
            stream = [] if args.no_bos else [np.asarray([bos], dtype=np.int64)]
            seen = 0

            def pieces():
                nonlocal seen
                yield from stream
                for text, done in read_pieces(path, args.encoding):
                    yield np.asarray(tokenizer.encode(text), dtype=np.int64)
                    bar.update(done - seen)
                    seen = done

            for ids in pieces():
                if skip >= ids.size:  # committed before the interruption: tokenized again, not stored again
                    skip -= ids.size
                    continue
                tree.ingest(ids[skip:])
                skip = 0
                rate = (tree.num_tokens - start_tokens) / max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{path.name}, {rate:,.0f} tok/s", refresh=False)
            tree.end_source()
        summary.update(tokens_added=tree.num_tokens - start_tokens, tokens=tree.num_tokens,
                       lod1_gists=tree.num_gists(1), lod2_gists=tree.num_gists(2), pending_tokens=tree.pending_tokens,
                       model_name=model_name, gistnet=_gistnet_label(identity), seconds=time.time() - t0)
    summary["tokens_per_s"] = summary["tokens_added"] / max(summary["seconds"], 1e-9)
    return summary


def refresh(args, cfg, out):
    """Regenerate all gists of the tree at `out` with the config's GistNet."""
    if not _has_tree(out):
        raise ValueError(f"--refresh: {out} holds no MegaContext tree")
    import torch
    from nanochat.common import autodetect_device_type
    from megacontext.gistnet import token_embeddings
    from megacontext.tree import MegaContextTree
    device = torch.device(cfg["device_type"] or autodetect_device_type())
    model, _, model_name = load_base_model(cfg, device)
    gistnet = load_gister(cfg["gistnet"], model.config.n_embd, device)
    identity = gistnet.identity()
    t0 = time.time()
    embed_fn = lambda ids: token_embeddings(model, ids)
    with MegaContextTree.open(out, expect_model_name=model_name, embed_fn=embed_fn, durable=False,
                              batch_blocks=cfg["batch_size"], device=device) as tree:
        tree.refresh(gistnet, identity, embed_fn=embed_fn)
        return {"out": str(out), "refreshed": True, "tokens": tree.num_tokens, "lod1_gists": tree.num_gists(1),
                "lod2_gists": tree.num_gists(2), "gistnet": _gistnet_label(identity), "seconds": time.time() - t0}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        s = run(args)
    except (ValueError, OSError, RuntimeError, CtxFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} keeps every whole block committed so far; re-run the same command "
              f"to continue from there", file=sys.stderr)
        return 130
    if s.get("skipped"):
        print(f"skipped {len(s['skipped'])} binary file(s) (a NUL byte in the first {BINARY_PROBE_BYTES} bytes), "
              f"e.g. {s['skipped'][0]}; choose files with --glob")
    if s.get("refreshed"):
        print(f"{s['out']}: regenerated {s['lod1_gists']:,} LOD1 and {s['lod2_gists']:,} LOD2 gists over "
              f"{s['tokens']:,} tokens in {s['seconds']:.1f}s with GistNet {s['gistnet']}")
        return 0
    if s.get("nothing_to_do"):
        print(f"{s['out']}: nothing to do, all {s['files']} source(s) are already whole in the tree")
        return 0
    parts = [f"{s['new']} new"] + ([f"1 resumed after {s['resumed_at']['tokens']:,} committed tokens"]
                                   if s.get("resumed_at") else []) + ([f"{s['whole']} already whole"] if s["whole"] else [])
    print(f"{s['out']}: +{s['tokens_added']:,} tokens from {s['files']} file(s) ({', '.join(parts)}) in "
          f"{s['seconds']:.1f}s ({s['tokens_per_s']:,.0f} tok/s); tree holds {s['tokens']:,} tokens, "
          f"{s['lod1_gists']:,} LOD1 and {s['lod2_gists']:,} LOD2 gists ({s['pending_tokens']} tokens pending in "
          f"the last block); model {s['model_name']!r}, GistNet {s['gistnet']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
