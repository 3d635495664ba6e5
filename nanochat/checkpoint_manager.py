"""
Saving and loading checkpoints: model weights, optimizer state and run metadata.

A checkpoint directory (e.g. <base_dir>/base_checkpoints/d12) holds, per saved step:
    model_{step:06d}.pt              the model state_dict (written by rank 0)
    meta_{step:06d}.json             run metadata: model_config, user_config, loop state, ...
    optim_{step:06d}_rank{rank}.pt   this rank's optimizer shard (every rank writes its own)

Every file is first written to a hidden temporary name in the same directory and then
renamed into place with os.replace, which is atomic on POSIX. A run that dies mid-save
therefore leaves either the previous set of files or the new complete file, never a
truncated model_*.pt that find_last_step (and hence resume / load_model) would pick up.
The meta file is written before the model file because find_last_step keys on model_*.pt.

Bad input (missing directory, missing step, unreadable file, a checkpoint that does not
fit the model its metadata describes) raises FileNotFoundError / ValueError / RuntimeError
with a one-line message that names the path and says what to do about it.
"""
import os
import re
import json
import uuid
import logging

import torch

from nanochat.common import get_base_dir, setup_default_logging
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer

setup_default_logging()
logger = logging.getLogger(__name__)


def log0(message):
    # logging from every rank of a torchrun job would repeat each line world_size times
    if int(os.environ.get('RANK', 0)) == 0:
        logger.info(message)

# -----------------------------------------------------------------------------
# Shims for checkpoints written by older versions of the model code


def _patch_missing_config_keys(model_config_kwargs):
    """Fill in GPTConfig fields that did not exist when an old checkpoint was saved (in place)."""
    # sliding-window attention came later: older models always attended over the full context
    if "window_pattern" not in model_config_kwargs:
        model_config_kwargs["window_pattern"] = "L"
        log0("Patching missing window_pattern in model config to 'L'")


def _patch_missing_keys(model_data, model_config):
    """Add parameters that old checkpoints lack, set to the value that makes them a no-op (in place)."""
    n_layer = model_config.n_layer
    if "resid_lambdas" not in model_data:
        # a residual scale of 1 leaves the stream untouched
        model_data["resid_lambdas"] = torch.ones(n_layer)
        log0("Patching missing resid_lambdas in model data to 1.0")
    if "x0_lambdas" not in model_data:
        # a weight of 0 on the initial embedding switches the x0 shortcut off
        model_data["x0_lambdas"] = torch.zeros(n_layer)
        log0("Patching missing x0_lambdas in model data to 0.0")

# -----------------------------------------------------------------------------
# File names and crash-safe writes


def _model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt")


def _write_atomically(path, write_fn):
    """
    Call write_fn(f) on a binary file opened at a temporary name next to `path`, flush it
    to disk, then rename it over `path`. On any failure the temporary file is removed and
    `path` is left as it was. The temporary name starts with a dot and ends in .tmp so
    that no checkpoint glob (model_*.pt, meta_*.json) can ever match it.
    """
    directory, name = os.path.split(path)
    tmp_path = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # plain open (not mkstemp) so the final file gets the usual umask permissions
        with open(tmp_path, "xb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        # BaseException: a Ctrl-C in the middle of a multi-GB save must not leave litter either
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        raise


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Save one step. Rank 0 writes the model and metadata; each rank writes its own optimizer shard."""
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        # metadata first: model_*.pt is what marks a step as present, so it must come last
        meta_path = _meta_path(checkpoint_dir, step)
        meta_bytes = json.dumps(meta_data, indent=2).encode("utf-8")
        _write_atomically(meta_path, lambda f: f.write(meta_bytes))
        logger.info(f"Saved metadata to: {meta_path}")
        model_path = _model_path(checkpoint_dir, step)
        _write_atomically(model_path, lambda f: torch.save(model_data, f))
        logger.info(f"Saved model parameters to: {model_path}")
    # the optimizer state is sharded across ranks, so there is one file per rank
    if optimizer_data is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        optimizer_path = _optim_path(checkpoint_dir, step, rank)
        _write_atomically(optimizer_path, lambda f: torch.save(optimizer_data, f))
        logger.info(f"Saved optimizer state to: {optimizer_path}")

# -----------------------------------------------------------------------------
# Reading, with errors that say what went wrong and how to fix it


def _list_steps(checkpoint_dir):
    """Sorted steps that have a model file in checkpoint_dir (same matching rule as find_last_step)."""
    names = [f for f in os.listdir(checkpoint_dir) if re.search(r'model_(\d+)\.pt$', f)]
    return sorted(int(f.split("_")[-1].split(".")[0]) for f in names)


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


def _torch_load(path, device, what, fix):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} not found; {fix}")
    try:
        return torch.load(path, map_location=device)
    except Exception as e:
        # torch raises a zoo of types for damaged files (RuntimeError, UnpicklingError, EOFError, ...)
        reason = (str(e).splitlines() or [""])[0]
        raise RuntimeError(
            f"{what} {path} is corrupt or unreadable ({type(e).__name__}: {reason}); "
            f"delete this step's files and load an earlier step, or re-save it") from e


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Return (model_data, optimizer_data or None, meta_data) for one saved step."""
    _require_dir(checkpoint_dir, "checkpoint directory")
    model_path = _model_path(checkpoint_dir, step)
    if not os.path.exists(model_path):
        steps = _list_steps(checkpoint_dir)
        available = ", ".join(str(s) for s in steps) if steps else "none"
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {checkpoint_dir} (model file {model_path} missing; "
            f"available steps: {available}); pass one of the available steps or omit the step to use the last")
    model_data = _torch_load(model_path, device, "model checkpoint",
                             "pass a step that exists in the checkpoint directory")
    optimizer_data = None
    if load_optimizer:
        optimizer_data = _torch_load(
            _optim_path(checkpoint_dir, step, rank), device, "optimizer checkpoint",
            "it is written at save time by every rank; resume with the same world size "
            "from a step saved with its optimizer state")
    meta_path = _meta_path(checkpoint_dir, step)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"metadata file {meta_path} not found (the model file exists without it); "
            f"restore it or load a different step")
    try:
        with open(meta_path, "r", encoding="utf-8") as f:
            meta_data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"metadata file {meta_path} is not valid JSON ({e}); "
            f"restore it or delete this step's files and load an earlier step") from e
    return model_data, optimizer_data, meta_data


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


def build_model(checkpoint_dir, step, device, phase):
    """
    Build the model saved at `step` in checkpoint_dir.
    Returns (model, tokenizer, meta_data): the model is plain (not compiled, not DDP-wrapped)
    and in train() or eval() mode according to phase.
    """
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    if device.type in {"cpu", "mps"}:
        # checkpoints from GPU runs may hold bf16 tensors; CPU/MPS inference wants fp32
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    # a torch.compile'd module's state_dict prefixes every key with _orig_mod.
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    if "model_config" not in meta_data:
        raise ValueError(f"{_meta_path(checkpoint_dir, step)} has no 'model_config' entry; "
                         f"it was not written by save_checkpoint, restore the original file")
    model_config_kwargs = meta_data["model_config"]
    _patch_missing_config_keys(model_config_kwargs)
    log0(f"Building model with config: {model_config_kwargs}")
    try:
        model_config = GPTConfig(**model_config_kwargs)
    except TypeError as e:
        raise ValueError(f"model_config in {_meta_path(checkpoint_dir, step)} does not match GPTConfig ({e}); "
                         f"the checkpoint comes from an incompatible version of nanochat") from e
    _patch_missing_keys(model_data, model_config)
    with torch.device("meta"):
        model = GPT(model_config)
    _check_state_dict_fits(model, model_data, checkpoint_dir, step, model_config)
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
    if tokenizer.get_vocab_size() != model_config_kwargs["vocab_size"]:
        raise ValueError(
            f"tokenizer vocab size {tokenizer.get_vocab_size()} does not match model config vocab size "
            f"{model_config_kwargs['vocab_size']} ({checkpoint_dir}); use the tokenizer this model was "
            f"trained with (NANOCHAT_BASE_DIR/tokenizer)")
    return model, tokenizer, meta_data


def find_largest_model(checkpoints_dir):
    """Guess a model tag: the largest d<N> subdirectory, else the most recently modified one."""
    _require_dir(checkpoints_dir, "checkpoints directory")
    model_tags = [f for f in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, f))]
    if not model_tags:
        raise FileNotFoundError(f"No checkpoints found in {checkpoints_dir}; it has no model-tag subdirectories "
                                f"(e.g. d12), train a model first or pass the right base dir")
    # tags are normally d<depth>, and the deepest model is the best guess
    by_depth = []
    for tag in model_tags:
        m = re.match(r"d(\d+)", tag)
        if m:
            by_depth.append((int(m.group(1)), tag))
    if by_depth:
        by_depth.sort(key=lambda pair: pair[0], reverse=True)
        return by_depth[0][1]
    # custom tags: fall back to whichever was written to most recently
    model_tags.sort(key=lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag)), reverse=True)
    return model_tags[0]


def find_last_step(checkpoint_dir):
    """The highest step that has a model_<step>.pt in checkpoint_dir."""
    _require_dir(checkpoint_dir, "checkpoint directory")
    steps = _list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"No checkpoints found in {checkpoint_dir} (no model_<step>.pt files); "
                                f"train or copy a checkpoint there, or pick another model tag")
    return steps[-1]

# -----------------------------------------------------------------------------
# Convenience loaders that know nanochat's directory layout

# which subdirectory of the base dir each training stage saves into
_SOURCE_DIRS = {
    "base": "base_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}


def _checkpoints_dir_for(source):
    if source not in _SOURCE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; use one of {', '.join(_SOURCE_DIRS)}")
    return os.path.join(get_base_dir(), _SOURCE_DIRS[source])


def load_model_from_dir(checkpoints_dir, device, phase, model_tag=None, step=None):
    """build_model for <checkpoints_dir>/<model_tag> at `step`, guessing the tag and step when not given."""
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log0(f"No model tag provided, guessing model tag: {model_tag}")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_model(source, *args, **kwargs):
    """load_model_from_dir for a training stage: source is 'base', 'sft' or 'rl'."""
    return load_model_from_dir(_checkpoints_dir_for(source), *args, **kwargs)


def load_optimizer_state(source, device, rank, model_tag=None, step=None):
    """This rank's optimizer shard for a saved step (None if that step was saved without one)."""
    checkpoints_dir = _checkpoints_dir_for(source)
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    optimizer_path = _optim_path(checkpoint_dir, step, rank)
    if not os.path.exists(optimizer_path):
        log0(f"Optimizer checkpoint not found: {optimizer_path}")
        return None
    log0(f"Loading optimizer state from {optimizer_path}")
    return _torch_load(optimizer_path, device, "optimizer checkpoint", "")
