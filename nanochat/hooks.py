"""
Variant registry: the one door through which extensions (e.g. MegaContext) reach nanochat.

nanochat itself never imports an extension. A run names its variant in its YAML config
(`variant: NAME`); this module finds it by name, in this order:
  1. variants registered in this process with `register_variant(name, factory)`
  2. the Python entry-point group `nanochat.variants` (declared in pyproject.toml)
  3. a dotted path "package.module:Factory"
and returns an instance. `vanilla` is the identity and the default.

A variant is a plain object; every member is optional, and nanochat calls only what exists:
  build(model, config) -> list[dict]   attach modules, return extra optimizer param groups
  loss(model, x, y) -> (loss, logs)    replace the training loss of one micro-batch
  on_step(step, metrics)               called after every optimizer step
  state_dict() / load_state_dict(sd)   its weights + resume state, saved as mc_XXXXXX.pt
  chat_session(engine, config)         wrap the chat runtime (used by nanochat/chat.py)
Keep this set as small as the call sites need (../shared/DESIGN.md section 3).

This file also reads run configs (YAML + `--key=value` overrides) for nanochat.train and
nanochat.chat, since a run config is where the variant is chosen.
"""

import os
import importlib
from importlib.metadata import entry_points

import yaml
import torch

ENTRY_POINT_GROUP = "nanochat.variants"


class VanillaVariant:
    """Upstream nanochat, unchanged. Every hook is absent, so call sites do nothing."""
    name = "vanilla"

    def __init__(self, config=None):
        self.config = config or {}


_REGISTRY = {"vanilla": VanillaVariant}


def register_variant(name, factory):
    """Register a variant factory (a class or a callable taking the variant's config dict)."""
    _REGISTRY[name] = factory


def _find_factory(name):
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        module_name, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"variant '{name}': cannot load {attr} from {module_name} ({e})") from None
    known = sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    raise ValueError(f"unknown variant '{name}'; known variants: {', '.join(known)} "
                     f"(or give a dotted path 'package.module:Factory')")


def get_variant(name="vanilla", config=None):
    """Instantiate the named variant with its config dict."""
    return _find_factory(name or "vanilla")(config or {})


def variant_param_groups(variant, model, config):
    """Let the variant attach its modules; return its extra optimizer groups (possibly [])."""
    build = getattr(variant, "build", None)
    return list(build(model, config) or []) if build is not None else []


def add_param_groups(optimizer, groups):
    """Append extra groups to a nanochat MuonAdamW, with initial_lr so the LR schedule drives them."""
    for group in groups:
        group.setdefault("initial_lr", group["lr"])
        optimizer.add_param_group(group)


def drop_frozen_params(optimizer):
    """
    Take parameters a variant froze (requires_grad=False, e.g. the base model while GistNet
    trains) out of the optimizer, dropping groups left empty: nanochat's MuonAdamW refuses
    parameters without gradients. A no-op, touching nothing, when nothing is frozen.
    """
    if all(p.requires_grad for group in optimizer.param_groups for p in group["params"]):
        return
    kept = []
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
        if group["params"]:
            kept.append(group)
    optimizer.param_groups[:] = kept


def variant_state_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"mc_{step:06d}.pt")


def save_variant_state(variant, checkpoint_dir, step, rank=0, into=None):
    """
    Save the variant's state next to upstream's files (rank 0 only). With `into` (the dict of
    extra files that save_checkpoint writes with the step) the state joins that dict, so it is
    checksummed and committed with the rest of the step; without, it is written on its own
    (temp name, then rename). Returns the path, or None when there is nothing to save.
    """
    state_dict = getattr(variant, "state_dict", None)
    if state_dict is None or rank != 0:
        return None
    path = variant_state_path(checkpoint_dir, step)
    if into is not None:
        into[os.path.basename(path)] = state_dict()
        return path
    tmp_path = path + ".tmp"
    torch.save(state_dict(), tmp_path)
    os.replace(tmp_path, path)
    return path


def load_variant_state(variant, checkpoint_dir, step, device):
    """Load mc_XXXXXX.pt into the variant, checked against the step's manifest when it has one."""
    load = getattr(variant, "load_state_dict", None)
    if load is None:
        return False
    from nanochat.checkpoint_manager import load_checkpoint_file  # imported late: hooks stays light
    path = variant_state_path(checkpoint_dir, step)
    state = load_checkpoint_file(checkpoint_dir, step, os.path.basename(path), device,
                                 what="variant state", fix="resume from a step that was saved by the same variant")
    if state is None:
        raise FileNotFoundError(f"variant '{variant.name}' has no state at {path}; "
                                f"resume from a step that was saved by the same variant")
    load(state)
    return True


# -----------------------------------------------------------------------------
# Run configs: YAML file + command-line overrides

def parse_overrides(tokens):
    """['--depth=4', '--megacontext.budget_tokens', '512'] -> {'depth': '4', 'megacontext.budget_tokens': '512'}"""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument '{token}'; overrides look like --key=value")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 1
        else:
            value = "true"  # a bare --flag switches a boolean on
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def _coerce(value, like, key):
    """Turn an override string into the type of the default it replaces."""
    if not isinstance(value, str):
        return value
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key '{key}' expects true/false, got '{value}'")
    try:
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except ValueError:
        raise ValueError(f"config key '{key}' expects {type(like).__name__}, got '{value}'") from None
    if like is None:
        return yaml.safe_load(value)  # best guess for keys whose default is None
    return value


def load_run_config(path, overrides, defaults):
    """
    Merge defaults <- YAML file <- overrides. `defaults` is a flat dict of known keys.
    The YAML may also hold `variant: NAME` and one mapping section per variant (its config).
    Returns (flat settings dict, variant name, variant config dict). Unknown keys are errors.
    """
    data = {}
    if path is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file not found: {path} (see configs/ for examples)")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must be a mapping of key: value")
    variant_name = str(overrides.pop("variant", data.pop("variant", "vanilla")))
    variant_config = data.pop(variant_name, None) or {}
    sections = {k: v for k, v in data.items() if isinstance(v, dict)}
    settings = dict(defaults)
    for key, value in data.items():
        if key in sections:
            raise ValueError(f"config section '{key}' belongs to variant '{key}', but this run uses "
                             f"variant '{variant_name}'; set `variant: {key}` or remove the section")
        key = key.replace("-", "_")
        if key not in defaults:
            raise ValueError(f"unknown config key '{key}' in {path}; known keys: {', '.join(sorted(defaults))}")
        settings[key] = _coerce(value, defaults[key], key)  # YAML reads 1e18 as a string
    for key, value in overrides.items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section != variant_name:
                raise ValueError(f"override --{key} is for variant '{section}', but this run uses '{variant_name}'")
            variant_config[sub] = _coerce(value, variant_config.get(sub), key)
            continue
        if key not in defaults:
            raise ValueError(f"unknown config key '{key}' (from the command line); known keys: {', '.join(sorted(defaults))}")
        settings[key] = _coerce(value, defaults[key], key)
    return settings, variant_name, variant_config
