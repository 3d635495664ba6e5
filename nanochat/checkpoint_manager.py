"""
Saving and loading checkpoints: model weights, optimizer state and run metadata.

A checkpoint directory (e.g. <base_dir>/base_checkpoints/d12) holds, per saved step:
    model_{step:06d}.pt              the model state_dict (written by rank 0)
    meta_{step:06d}.json             run metadata: model_config, user_config, loop state, ...
    optim_{step:06d}_rank{rank}.pt   this rank's optimizer shard (every rank writes its own)
    manifest_{step:06d}.json         ours: the commit marker, with each file's size and SHA-256
plus whatever extra files the caller saves with the step (train.py: loader_*_rank*.pt, mc_*.pt).

Every file is first written to a hidden temporary name in the same directory, fsynced and
renamed into place with os.replace, which is atomic on POSIX, so no file is ever half
written. A step as a whole is committed by its manifest, written after everything else
(see the section below): find_last_step, load_checkpoint and resume read committed steps
only, and every file read from one is checked against its recorded checksum. A save that
finds a NaN or inf in a tensor refuses to write anything. Temp files left by killed saves
are removed by the next save.

Bad input (missing directory, missing step, unreadable file, a checkpoint that does not
fit the model its metadata describes) raises FileNotFoundError / ValueError / RuntimeError
with a one-line message that names the path and says what to do about it.

Upstream's functions come first, in upstream's order; our machinery (the manifest, atomic
writes, the checks behind those errors) is grouped in the two sections at the end.
"""
import os
import re
import json
import time
import uuid
import hashlib
import logging
import torch
import torch.distributed as dist

from nanochat.common import get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer
from nanochat.common import setup_default_logging

setup_default_logging()
logger = logging.getLogger(__name__)
def log0(message):
    # logging from every rank of a torchrun job would repeat each line world_size times
    if int(os.environ.get('RANK', 0)) == 0:
        logger.info(message)

def _patch_missing_config_keys(model_config_kwargs):
    """Fill in GPTConfig fields that did not exist when an old checkpoint was saved (in place)."""
    # sliding-window attention came later: older models always attended over the full context
    if "window_pattern" not in model_config_kwargs:
        model_config_kwargs["window_pattern"] = "L"
        log0(f"Patching missing window_pattern in model config to 'L'")

def _patch_missing_keys(model_data, model_config):
    """Add parameters that old checkpoints lack, set to the value that makes them a no-op (in place)."""
    n_layer = model_config.n_layer
    # a residual scale of 1 leaves the stream untouched
    if "resid_lambdas" not in model_data:
        model_data["resid_lambdas"] = torch.ones(n_layer)
        log0(f"Patching missing resid_lambdas in model data to 1.0")
    # a weight of 0 on the initial embedding switches the x0 shortcut off
    if "x0_lambdas" not in model_data:
        model_data["x0_lambdas"] = torch.zeros(n_layer)
        log0(f"Patching missing x0_lambdas in model data to 0.0")

def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, extra_files=None):
    """
    Save one step. Rank 0 writes the model and metadata; each rank writes its own optimizer
    shard (the optimizer state is sharded across ranks) and its extra_files ({file name:
    object for torch.save}, e.g. loader snapshots; ours). Ours: the step is committed
    (manifest_{step}.json) only once every file is on disk, the model file last; a save
    with a NaN/inf in any tensor writes nothing and raises ValueError.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    # what this rank writes, in order: {file name: write_fn(f)}
    own = {}
    if rank == 0:
        model_path = _model_path(checkpoint_dir, step)
        meta_path = _meta_path(checkpoint_dir, step)
        # json.dumps before any write, so unserializable metadata leaves no trace on disk
        meta_bytes = json.dumps(meta_data, indent=2).encode("utf-8")
        own[os.path.basename(meta_path)] = lambda f: f.write(meta_bytes)
    if optimizer_data is not None:
        optimizer_path = _optim_path(checkpoint_dir, step, rank)
        own[os.path.basename(optimizer_path)] = _torch_saver(optimizer_data)
    for name, obj in (extra_files or {}).items():
        own[name] = _torch_saver(obj)
    # ours: refuse to persist a diverged run: a NaN weight saved is a NaN model loaded
    for what, data in [("model", model_data if rank == 0 else None), ("optimizer state", optimizer_data),
                       *[(name, obj) for name, obj in (extra_files or {}).items()]]:
        bad = _first_non_finite(data)
        if bad is not None:
            raise ValueError(
                f"refusing to save step {step} to {checkpoint_dir}: {bad} in the {what} holds NaN or inf; "
                f"the run has diverged, so resume from an earlier step (e.g. with a lower learning rate)")
    if rank == 0:
        remove_stale_temp_files(checkpoint_dir)
    # ours: uncommit first: from here until the final manifest, readers skip this step. Every
    # rank writes it (identical bytes, atomic rename) so none overwrites a file of a committed step.
    pending = json.dumps({"step": step, "committed": False}).encode("utf-8")
    _write_atomically(manifest_path(checkpoint_dir, step), lambda f: f.write(pending))
    records = {}
    for name, write_fn in own.items():
        if _before_write is not None:
            _before_write(name)
        records[name] = _write_atomically(os.path.join(checkpoint_dir, name), write_fn)
        logger.info(f"Saved {name} to {checkpoint_dir}")
    records, world_size = _gather_records(records, rank, optimizer_data)
    if rank != 0:
        return
    # the model file last: upstream's readers key on model_*.pt, so they too see it only once
    # the rest of the step is there
    if _before_write is not None:
        _before_write(os.path.basename(model_path))
    records[os.path.basename(model_path)] = _write_atomically(model_path, _torch_saver(model_data))
    logger.info(f"Saved model parameters to: {model_path}")
    # ours: the commit
    manifest = {"step": step, "committed": True, "world_size": world_size, "files": dict(sorted(records.items()))}
    manifest_bytes = json.dumps(manifest, indent=2).encode("utf-8")
    if _before_write is not None:
        _before_write(os.path.basename(manifest_path(checkpoint_dir, step)))
    _write_atomically(manifest_path(checkpoint_dir, step), lambda f: f.write(manifest_bytes))
    log0(f"Committed step {step} in {checkpoint_dir} ({len(records)} files)")

def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Return (model_data, optimizer_data or None, meta_data) for one saved step."""
    _require_dir(checkpoint_dir, "checkpoint directory")  # ours: one-line errors, checksums
    manifest = _committed_manifest(checkpoint_dir, step)
    model_path = _model_path(checkpoint_dir, step)
    if not os.path.exists(model_path):
        steps = _usable_steps(checkpoint_dir)
        available = ", ".join(str(s) for s in steps) if steps else "none"
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {checkpoint_dir} (model file {model_path} missing; "
            f"available steps: {available}); pass one of the available steps or omit the step to use the last")
    model_data = _torch_load(model_path, device, "model checkpoint",
                             "pass a step that exists in the checkpoint directory", step, manifest)
    optimizer_data = None
    if load_optimizer:
        optimizer_path = _optim_path(checkpoint_dir, step, rank)
        if manifest is not None:
            fix = (f"step {step} was saved by {manifest.get('world_size', 1)} rank(s); resume with that many "
                   f"processes, or from a step saved with its optimizer state")
        else:
            fix = ("it is written at save time by every rank; resume with the same world size "
                   "from a step saved with its optimizer state")
        optimizer_data = _torch_load(optimizer_path, device, "optimizer checkpoint", fix, step, manifest)
    meta_path = _meta_path(checkpoint_dir, step)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"metadata file {meta_path} not found (the model file exists without it); "
            f"restore it or load a different step")
    _verify(meta_path, step, manifest)
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            meta_data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"metadata file {meta_path} is not valid JSON ({e}); "
            f"restore it or delete this step's files and load an earlier step") from e
    return model_data, optimizer_data, meta_data


def build_model(checkpoint_dir, step, device, phase):
    """
    Build the model saved at `step` in checkpoint_dir.
    Returns (model, tokenizer, meta_data): the model is plain (not compiled, not DDP-wrapped)
    and in train() or eval() mode according to phase.
    """
    if phase not in ("train", "eval"):  # ours: ValueErrors where upstream asserts
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    model_data, optimizer_data, meta_data = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    if device.type in {"cpu", "mps"}:
        # checkpoints from GPU runs may hold bf16 tensors; CPU/MPS inference wants fp32
        model_data = {
            k: v.float() if v.dtype == torch.bfloat16 else v
            for k, v in model_data.items()
        }
    # a torch.compile'd module's state_dict prefixes every key with _orig_mod.
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    if "model_config" not in meta_data:  # ours
        raise ValueError(f"{_meta_path(checkpoint_dir, step)} has no 'model_config' entry; "
                         f"it was not written by save_checkpoint, restore the original file")
    model_config_kwargs = meta_data["model_config"]
    _patch_missing_config_keys(model_config_kwargs)
    log0(f"Building model with config: {model_config_kwargs}")
    try:
        model_config = GPTConfig(**model_config_kwargs)
    except TypeError as e:  # ours
        raise ValueError(f"model_config in {_meta_path(checkpoint_dir, step)} does not match GPTConfig ({e}); "
                         f"the checkpoint comes from an incompatible version of nanochat") from e
    _patch_missing_keys(model_data, model_config)
    with torch.device("meta"):
        model = GPT(model_config)
    _check_state_dict_fits(model, model_data, checkpoint_dir, step, model_config)  # ours: one line, not a wall
    model.to_empty(device=device)
    # init_weights is mostly overwritten by the load below, but it is also what computes the
    # rotary cos/sin buffers, which are not part of the state_dict
    model.init_weights()
    model.load_state_dict(model_data, strict=True, assign=True)
    if phase == "eval":
        model.eval()
    else:
        model.train()
    tokenizer = get_tokenizer()
    # the model and the tokenizer must agree on the vocabulary
    if tokenizer.get_vocab_size() != model_config_kwargs["vocab_size"]:
        raise ValueError(
            f"tokenizer vocab size {tokenizer.get_vocab_size()} does not match model config vocab size "
            f"{model_config_kwargs['vocab_size']} ({checkpoint_dir}); use the tokenizer this model was "
            f"trained with (NANOCHAT_BASE_DIR/tokenizer)")
    return model, tokenizer, meta_data


def find_largest_model(checkpoints_dir):
    # guess a model tag: the largest d<N> subdirectory, else the most recently modified one
    _require_dir(checkpoints_dir, "checkpoints directory")  # ours
    model_tags = [f for f in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, f))]
    if not model_tags:
        raise FileNotFoundError(f"No checkpoints found in {checkpoints_dir}; it has no model-tag subdirectories "
                                f"(e.g. d12), train a model first or pass the right base dir")
    # 1) tags are normally d<depth>, and the deepest model is the best guess
    candidates = []
    for model_tag in model_tags:
        match = re.match(r"d(\d+)", model_tag)
        if match:
            model_depth = int(match.group(1))
            candidates.append((model_depth, model_tag))
    if candidates:
        candidates.sort(key=lambda x: x[0], reverse=True)
        return candidates[0][1]
    # 2) custom tags: fall back to whichever was written to most recently
    model_tags.sort(key=lambda x: os.path.getmtime(os.path.join(checkpoints_dir, x)), reverse=True)
    return model_tags[0]


def find_last_step(checkpoint_dir):
    # the highest committed step (ours: manifests; for upstream-written steps, the highest
    # model_<step>.pt); newer steps whose save never finished are skipped, with a log line
    _require_dir(checkpoint_dir, "checkpoint directory")
    steps = _list_steps(checkpoint_dir)
    for step in reversed(steps):
        status, _ = step_status(checkpoint_dir, step)
        if status in ("committed", "legacy"):
            last_step = step
            return last_step
        log0(f"Skipping step {step} in {checkpoint_dir}: its save did not finish (no committed "
             f"{os.path.basename(manifest_path(checkpoint_dir, step))}); looking at earlier steps")
    if steps:
        raise FileNotFoundError(f"No committed checkpoint in {checkpoint_dir}: every step's save was interrupted "
                                f"(steps {', '.join(map(str, steps))}); train again or copy a checkpoint there")
    raise FileNotFoundError(f"No checkpoints found in {checkpoint_dir} (no model_<step>.pt files); "
                            f"train or copy a checkpoint there, or pick another model tag")

# -----------------------------------------------------------------------------
# Convenience loaders that know nanochat's directory layout

def load_model_from_dir(checkpoints_dir, device, phase, model_tag=None, step=None):
    # build_model for <checkpoints_dir>/<model_tag> at `step`, guessing the tag and step when not given
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log0(f"No model tag provided, guessing model tag: {model_tag}")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)  # raises when there is none
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    model, tokenizer, meta_data = build_model(checkpoint_dir, step, device, phase)
    return model, tokenizer, meta_data

def load_model(source, *args, **kwargs):
    # source is the training stage: 'base', 'sft' or 'rl'
    checkpoints_dir = _checkpoints_dir_for(source)  # ours: upstream's model_dir lookup, with a ValueError
    return load_model_from_dir(checkpoints_dir, *args, **kwargs)

def load_optimizer_state(source, device, rank, model_tag=None, step=None):
    """This rank's optimizer shard for a saved step (None if that step was saved without one)."""
    checkpoints_dir = _checkpoints_dir_for(source)
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    manifest = _committed_manifest(checkpoint_dir, step)  # ours
    optimizer_path = _optim_path(checkpoint_dir, step, rank)
    if not os.path.exists(optimizer_path):
        log0(f"Optimizer checkpoint not found: {optimizer_path}")
        return None
    log0(f"Loading optimizer state from {optimizer_path}")
    optimizer_data = _torch_load(optimizer_path, device, "optimizer checkpoint", "", step, manifest)
    return optimizer_data

# -----------------------------------------------------------------------------
# Ours: file names, crash-safe writes and the commit manifest
#
# A step is committed by manifest_{step:06d}.json, written last, after every other file
# of the step is durable on every rank. It records, for each file of the step (model,
# meta, every rank's optim, loader snapshots, mc_ state), its size and SHA-256, and every
# read of a file of a committed step checks them. The first thing a save writes is the
# same manifest marked pending, so a save killed at any point leaves a step that readers
# recognise as unfinished and skip. A step with model_*.pt and no manifest at all was
# written by upstream's save_checkpoint (or by ours before manifests existed): it is
# read as upstream reads it, without checks. The data files keep upstream's names and
# contents, so upstream's loaders read our checkpoints unchanged.

# process start: temp files older than this were left by a writer that has died
_PROCESS_START = time.time()


def _model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


def manifest_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"manifest_{step:06d}.json")


class _HashingWriter:
    """A file wrapper that hashes the bytes as they are written, so a save never re-reads its file."""

    def __init__(self, f):
        self.f, self.sha256, self.nbytes = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _write_atomically(path, write_fn):
    """
    Call write_fn(f) on a binary file opened at a temporary name next to `path`, flush it
    to disk, then rename it over `path`. On any failure the temporary file is removed and
    `path` is left as it was. The temporary name starts with a dot and ends in .tmp so
    that no checkpoint glob (model_*.pt, meta_*.json) can ever match it.
    Returns {"bytes": size, "sha256": hex digest} of what was written.
    """
    directory, name = os.path.split(path)
    tmp_path = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # plain open (not mkstemp) so the final file gets the usual umask permissions
        with open(tmp_path, "xb") as f:
            writer = _HashingWriter(f)
            write_fn(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(directory)
    except BaseException:
        # BaseException: a Ctrl-C in the middle of a multi-GB save must not leave litter either
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        raise
    return {"bytes": writer.nbytes, "sha256": writer.sha256.hexdigest()}


def _fsync_dir(directory):
    # the rename itself is only durable once the directory entry is on disk
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def remove_stale_temp_files(checkpoint_dir):
    """Remove .*.tmp files that a killed save left behind (older than this process); returns their names."""
    removed = []
    try:
        names = os.listdir(checkpoint_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        path = os.path.join(checkpoint_dir, name)
        try:
            # newer ones may belong to another rank of this very run, saving right now
            if os.path.getmtime(path) < _PROCESS_START:
                os.remove(path)
                removed.append(name)
        except FileNotFoundError:
            pass
    if removed:
        log0(f"Removed {len(removed)} temporary file(s) left by an interrupted save in {checkpoint_dir}")
    return removed


def _first_non_finite(obj, prefix=""):
    """Name of the first floating-point tensor in a (nested) state dict that holds a NaN or inf, else None."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and obj.numel() > 0:
            # one reduction, no mask: a NaN or inf anywhere makes the sum non-finite; only then
            # (or when a huge finite sum overflows) is the exact elementwise check needed
            if not bool(torch.isfinite(obj.sum(dtype=torch.float32))) and not bool(torch.isfinite(obj).all()):
                return prefix or "<tensor>"
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def _gather_records(records, rank, optimizer_data):
    """All ranks' {file: record} on rank 0. A save with optimizer state runs on every rank
    (the optimizer is sharded, as upstream saves it); a model-only save runs on rank 0 alone."""
    if optimizer_data is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return records, 1
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged, len(gathered)


def _torch_saver(obj):
    return lambda f: torch.save(obj, f)


# a test hook: called with each file name just before it is written (a test raises in it to
# play a process killed between two writes)
_before_write = None

# -----------------------------------------------------------------------------
# Ours: reading committed steps, with errors that say what went wrong and how to fix it


def _list_steps(checkpoint_dir):
    """Sorted steps that have a model file or a manifest in checkpoint_dir."""
    steps = set()
    for name in os.listdir(checkpoint_dir):
        m = re.fullmatch(r'(?:model_(\d+)\.pt|manifest_(\d+)\.json)', name)
        if m:
            steps.add(int(m.group(1) or m.group(2)))
    return sorted(steps)


def read_manifest(checkpoint_dir, step):
    """The step's manifest dict, or None when it has none (a step written by upstream's saver)."""
    path = manifest_path(checkpoint_dir, step)
    try:
        with open(path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint manifest {path} is damaged ({e}); load an earlier step, "
                         f"or delete this step's files") from e
    if not isinstance(manifest, dict) or "committed" not in manifest:
        raise ValueError(f"checkpoint manifest {path} has no 'committed' entry; it was not written by "
                         f"save_checkpoint, delete it or load an earlier step")
    return manifest


def step_status(checkpoint_dir, step):
    """(status, manifest): 'committed', 'pending' (a save that did not finish), 'legacy' (model file
    without manifest, as upstream writes) or 'missing'."""
    manifest = read_manifest(checkpoint_dir, step)
    if manifest is not None:
        return ("committed" if manifest["committed"] else "pending"), manifest
    if os.path.exists(_model_path(checkpoint_dir, step)):
        return "legacy", None
    return "missing", None


def _usable_steps(checkpoint_dir):
    return [s for s in _list_steps(checkpoint_dir) if step_status(checkpoint_dir, s)[0] in ("committed", "legacy")]


def _not_committed_error(checkpoint_dir, step):
    usable = _usable_steps(checkpoint_dir)
    hint = f"the last committed step is {usable[-1]}" if usable else "no step there is committed"
    return FileNotFoundError(
        f"step {step} in {checkpoint_dir} was never committed (its save was interrupted before "
        f"{os.path.basename(manifest_path(checkpoint_dir, step))} was completed); {hint}, "
        f"load or resume from that one")


def _verify(path, step, manifest):
    """Check a file of a committed step against the size and SHA-256 its manifest recorded."""
    if manifest is None:
        return  # upstream-written step: nothing recorded to check against
    name = os.path.basename(path)
    record = manifest.get("files", {}).get(name)
    if record is None:
        return  # not part of the step (the caller's own not-found message applies)
    fix = ("the file is damaged; load an earlier step, or restore the file from a copy "
           f"(expected {record['bytes']} bytes, sha256 {record['sha256'][:16]}...)")
    size = os.path.getsize(path)
    if size != record["bytes"]:
        raise RuntimeError(f"{path} has {size} bytes but step {step} was committed with {record['bytes']}; {fix}")
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha256.update(chunk)
    if sha256.hexdigest() != record["sha256"]:
        raise RuntimeError(f"{path} does not match the checksum recorded when step {step} was committed; {fix}")


def _other_base_dirs_holding(path):
    """Base dirs other than this one that hold `path`'s part below the base dir (e.g.
    base_checkpoints/cpu_tiny). Looked for where our presets write: ~/.cache/nanochat*
    (~/.cache/nanochat by default, ~/.cache/nanochat-cpu for speedrun.sh's CPU preset)."""
    base_dir = os.path.realpath(get_base_dir())
    relative = os.path.relpath(os.path.realpath(path), base_dir)
    if relative.startswith(os.pardir):
        return []  # not a path inside the base dir: nothing to compare
    cache = os.path.join(os.path.expanduser("~"), ".cache")
    try:
        names = sorted(n for n in os.listdir(cache) if n == "nanochat" or n.startswith("nanochat-"))
    except OSError:
        return []
    found = []
    for name in names:
        candidate = os.path.join(cache, name)
        if os.path.realpath(candidate) != base_dir and os.path.isdir(os.path.join(candidate, relative)):
            found.append(candidate)
    return found


def _require_dir(path, what):
    if not os.path.isdir(path):
        elsewhere = _other_base_dirs_holding(path)
        hint = ""
        if elsewhere:
            where = " or ".join(f"NANOCHAT_BASE_DIR={d}" for d in elsewhere)
            hint = f" ({os.path.relpath(path, get_base_dir())} is there: set {where}, e.g. as a prefix of the command)"
        raise FileNotFoundError(
            f"{what} {path} does not exist; train a model first (e.g. python -m scripts.base_train) "
            f"or point NANOCHAT_BASE_DIR at the directory that holds your checkpoints{hint}")


def _torch_load(path, device, what, fix, step=None, manifest=None):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} not found; {fix}")
    _verify(path, step, manifest)
    try:
        return torch.load(path, map_location=device)
    except Exception as e:
        # torch raises a zoo of types for damaged files (RuntimeError, UnpicklingError, EOFError, ...)
        reason = (str(e).splitlines() or [""])[0]
        raise RuntimeError(
            f"{what} {path} is corrupt or unreadable ({type(e).__name__}: {reason}); "
            f"delete this step's files and load an earlier step, or re-save it") from e


def _committed_manifest(checkpoint_dir, step):
    """The manifest of a step that may be read (None for an upstream-written one); raises for a half step."""
    status, manifest = step_status(checkpoint_dir, step)
    if status == "pending":
        raise _not_committed_error(checkpoint_dir, step)
    return manifest


def load_checkpoint_file(checkpoint_dir, step, name, device, what="checkpoint file", fix="load an earlier step"):
    """torch.load one more file of a step (loader snapshot, mc_ state), checked against the manifest.
    Returns None when the step has no such file and its manifest does not list one."""
    manifest = _committed_manifest(checkpoint_dir, step)
    path = os.path.join(checkpoint_dir, name)
    listed = manifest is not None and name in manifest.get("files", {})
    if not os.path.exists(path) and not listed:
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} is missing although step {step} was committed with it; "
                                f"restore it or {fix}")
    return _torch_load(path, device, what, fix, step, manifest)


def _describe_checkpoint_shape(model_data):
    """A short 'depth/width' description of a state_dict, for error messages."""
    layers = {int(m.group(1)) for k in model_data for m in [re.match(r"transformer\.h\.(\d+)\.", k)] if m}
    wte = model_data.get("transformer.wte.weight")
    width = f", n_embd={wte.shape[1]}" if wte is not None and wte.ndim == 2 else ""
    return f"d{len(layers)}{width}" if layers else f"an unrecognised layout{width}"


def _check_state_dict_fits(model, model_data, checkpoint_dir, step, model_config):
    """Compare keys and shapes before load_state_dict, whose own error is a wall of text."""
    expected = model.state_dict()
    hint = (f"the checkpoint looks like a {_describe_checkpoint_shape(model_data)} model; pick the matching "
            f"--model-tag / --depth, or fix model_config in {_meta_path(checkpoint_dir, step)}")
    for key, tensor in expected.items():
        if key in model_data and tuple(model_data[key].shape) != tuple(tensor.shape):
            raise RuntimeError(
                f"{_model_path(checkpoint_dir, step)} does not fit the model its metadata describes "
                f"(d{model_config.n_layer}, n_embd={model_config.n_embd}): {key} has shape "
                f"{tuple(model_data[key].shape)} in the checkpoint but {tuple(tensor.shape)} in the model; {hint}")
    missing = [k for k in expected if k not in model_data]
    unexpected = [k for k in model_data if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), first {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]}")
        raise RuntimeError(
            f"{_model_path(checkpoint_dir, step)} does not fit the model its metadata describes "
            f"(d{model_config.n_layer}): {'; '.join(parts)}; {hint}")


# which subdirectory of the base dir each training stage saves into
_SOURCE_DIRS = {
    "base": "base_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}


def _checkpoints_dir_for(source):
    if source not in _SOURCE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; use one of {', '.join(_SOURCE_DIRS)}")
    model_dir = _SOURCE_DIRS[source]
    base_dir = get_base_dir()
    checkpoints_dir = os.path.join(base_dir, model_dir)
    return checkpoints_dir
