"""
Variant registry: the one door through which extensions (e.g. MegaContext) reach nanochat.

nanochat itself never imports an extension. A run names its variant in its YAML config
(`variant: NAME`); this module finds it by name, in this order:
  1. variants registered in this process with `register_variant(name, factory)`
  2. the Python entry-point group `nanochat.variants` (declared in pyproject.toml)
  3. a dotted path "package.module:Factory"
and returns an instance. `vanilla` is the identity and the default.

A variant is a plain object; every member is optional, and nanochat calls only what exists:
  build(model, config, resuming) -> list[dict]   attach modules, return extra optimizer param
                                       groups; resuming=True: the model already holds the
                                       checkpoint's weights, so build must not reset them
  train_loader(tokenizer, B, T, device, resume_state_dict) -> iterator of (x, y, state_dict)
                                       the variant's own training data (as a data source's,
                                       below); x and y may be anything its loss() reads
  loss(model, batch, step) -> (loss, metrics)   replace the training loss of one micro-batch;
                                       batch = (x, y) from the loader, step = the optimizer step.
                                       metrics are printed at the end of the step line and
                                       logged to the trainer's wandb run; metrics["tokens"] (the
                                       positions the model really trained on in this micro-batch)
                                       replaces B*T in tok/s and MFU
  on_step(step, metrics)               called after every optimizer step
  finish()                             called once when training ends
  state_dict() / load_state_dict(sd)   its weights + resume state, saved as mc_XXXXXX.pt
  max_nonfinite_steps (int attribute)  opt into the NaN/inf guard: a step whose loss or grads
                                       are not finite is skipped (no parameter moves), counted
                                       in variant.nonfinite_skipped; that many in a row stops
                                       the run naming the last saved step
  chat_session(engine, config)         wrap the chat runtime (used by nanochat/chat.py)
The trainer clears every optimizer parameter's grad after each step (the variant's modules
too), and a param group none of whose parameters got a grad this step (a module a phase
froze) sits the step out. Keep this set as small as the call sites need (../shared/DESIGN.md
section 3).

A run config may also name a *data source* (a `data:` section with `source: NAME`), found the
same way (entry-point group `nanochat.data_sources`, or a dotted path). It replaces the
pretraining loader of any variant, vanilla included:
  train_loader(tokenizer, B, T, device, resume_state_dict) -> iterator of (x, y, state_dict)
  val_loader(tokenizer, B, T, device) -> iterator of (x, y)
  describe() -> str                    one line for the log
with state_dict carrying 'epoch', 'pq_idx', 'rg_idx' (printed by the trainer) and 'exact'
(saved as the loader snapshot). Without a `data:` section nothing changes.

This file also reads run configs (YAML + `--key=value` overrides) for nanochat.train and
nanochat.chat, since a run config is where the variant is chosen.
"""

import os
import importlib
from importlib.metadata import entry_points

import yaml

ENTRY_POINT_GROUP = "nanochat.variants"
DATA_SOURCE_GROUP = "nanochat.data_sources"


class VanillaVariant:
    """Upstream nanochat, unchanged. Every hook is absent, so call sites do nothing."""
    name = "vanilla"

    def __init__(self, config=None):
        self.config = config or {}


_REGISTRY = {"vanilla": VanillaVariant}


def register_variant(name, factory):
    """Register a variant factory (a class or a callable taking the variant's config dict)."""
    _REGISTRY[name] = factory


def _find_factory(name, registry=_REGISTRY, group=ENTRY_POINT_GROUP, what="variant"):
    if name in registry:
        return registry[name]
    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        module_name, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{what} '{name}': cannot load {attr} from {module_name} ({e})") from None
    known = sorted(set(registry) | {ep.name for ep in entry_points(group=group)})
    raise ValueError(f"unknown {what} '{name}'; known {what}s: {', '.join(known) or '(none)'} "
                     f"(or give a dotted path 'package.module:Factory')")


def get_variant(name="vanilla", config=None):
    """Instantiate the named variant with its config dict."""
    return _find_factory(name or "vanilla")(config or {})


def get_data_source(config):
    """The data source named by a run config's `data:` section, or None when there is none."""
    if not config:
        return None
    if "source" not in config:
        raise ValueError("the data section needs `source: NAME` (e.g. `source: longdocs`)")
    factory = _find_factory(str(config["source"]), registry={}, group=DATA_SOURCE_GROUP, what="data source")
    return factory(dict(config))


def data_loaders(data_source, train_loader, build_val_loader, tokenizer, B, T, device, resume_state_dict,
                 variant=None):
    """The trainer's (train_loader, build_val_loader): its own when there is no data source
    (unchanged, so a vanilla run is upstream's), else the data source's; a variant with its
    own train_loader replaces the training stream either way (validation bpb keeps reading
    the data source's or upstream's rows)."""
    from nanochat.common import print0
    if data_source is not None:
        describe = getattr(data_source, "describe", None)
        print0(f"Data: {describe() if describe else type(data_source).__name__}")
        train_loader = data_source.train_loader(tokenizer, B, T, device, resume_state_dict)
        build_val_loader = (lambda: data_source.val_loader(tokenizer, B, T, device))
    variant_loader = getattr(variant, "train_loader", None)
    if variant_loader is not None:
        print0(f"Training data: variant '{getattr(variant, 'name', type(variant).__name__)}'s own loader")
        train_loader = variant_loader(tokenizer, B, T, device, resume_state_dict)
    return train_loader, build_val_loader


def variant_param_groups(variant, model, config, resuming=False):
    """Let the variant attach its modules; return its extra optimizer groups (possibly [])."""
    build = getattr(variant, "build", None)
    return list(build(model, config, resuming) or []) if build is not None else []


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


def trained_tokens(metrics, total_batch_size, micro_batches):
    """Tokens trained in one optimizer step, for tok/s and MFU: the variant's metrics["tokens"]
    (per micro-batch and rank) times the micro-batches of the step (grad accumulation x ranks),
    else total_batch_size, as upstream counts."""
    tokens = (metrics or {}).get("tokens")
    return total_batch_size if tokens is None else int(tokens) * micro_batches


def _grads_finite(params):
    import torch
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.float().abs().max() for g in grads])).all())


def last_saved_step(checkpoint_dir):
    from nanochat.checkpoint_manager import find_last_step
    try:
        return find_last_step(checkpoint_dir)
    except (FileNotFoundError, ValueError):
        return None


def before_optimizer_step(variant, optimizer, train_loss, step, checkpoint_dir, scaler=None):
    """
    Right before optimizer.step(). With a variant that sets max_nonfinite_steps, a step whose
    loss or grads hold NaN/inf loses every grad (so no parameter, and no optimizer state,
    moves), is counted in variant.nonfinite_skipped, and returns the last finite loss in place
    of the bad one, so the smoothed loss and the checkpoints stay finite; max_nonfinite_steps
    such steps in a row stop the run naming the last saved step. All ranks decide together.
    Under fp16's GradScaler the scaler owns the grads: their overflow is routine (it skips
    those steps and lowers its scale), so only a non-finite loss counts, and its grads are
    made NaN rather than dropped, so the scaler skips the step as its own (it refuses to step
    an optimizer whose grads it never checked).
    Then param groups without any grad (all of a vanilla run's have one) are set aside until
    after_optimizer_step. Returns the loss to log.
    """
    import torch
    limit = getattr(variant, "max_nonfinite_steps", None)
    if limit:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = bool(torch.isfinite(train_loss).all()) and (scaler is not None or _grads_finite(params))
        bad = torch.tensor(0.0 if finite else 1.0)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            bad = bad.to(train_loss.device)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if float(bad) > 0:
            for p in params:
                if scaler is None:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.fill_(float("nan"))
            variant.nonfinite_skipped = getattr(variant, "nonfinite_skipped", 0) + 1
            variant.nonfinite_in_row = getattr(variant, "nonfinite_in_row", 0) + 1
            if variant.nonfinite_in_row >= limit:
                last = last_saved_step(checkpoint_dir)
                where = (f"the last saved checkpoint is {checkpoint_dir} step {last} "
                         f"(resume with --resume-from-step={last}, e.g. at a lower learning rate)") if last is not None \
                    else f"no checkpoint was saved yet in {checkpoint_dir}"
                raise RuntimeError(f"step {step}: the loss or its gradients were NaN/inf for {variant.nonfinite_in_row} "
                                   f"steps in a row (max_nonfinite_steps={limit}), so training stops; {where}")
            train_loss = getattr(variant, "last_finite_loss", torch.zeros_like(train_loss))
        else:
            variant.nonfinite_in_row = 0
            variant.last_finite_loss = train_loss
    idle = [g for g in optimizer.param_groups if all(p.grad is None for p in g["params"])]
    if idle:
        optimizer._all_param_groups = list(optimizer.param_groups)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if not any(g is i for i in idle)]
    return train_loss


def after_optimizer_step(optimizer):
    """Right after optimizer.step(): the groups set aside return in their order (the order
    optimizer.state_dict() is saved in), and every parameter's grad is cleared, the
    variant's modules outside the GPT included."""
    everything = getattr(optimizer, "_all_param_groups", None)
    if everything is not None:
        optimizer.param_groups[:] = everything
        del optimizer._all_param_groups
    optimizer.zero_grad(set_to_none=True)


def finish_variant(variant):
    finish = getattr(variant, "finish", None)
    if finish is not None:
        finish()


def variant_metrics_line(metrics):
    """' | key: value' for each metric a variant's loss() returned (appended to the step line);
    '' for none, so a vanilla run prints upstream's line."""
    parts = []
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            parts.append(f"{key}: {value}")
        else:
            parts.append(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return "".join(f" | {p}" for p in parts)


def variant_wandb_metrics(metrics):
    """A variant's numeric metrics as 'variant/<key>' entries of the trainer's own wandb log."""
    return {f"variant/{k}": v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


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
    import torch  # imported late: a CLI reading its run config rejects a bad flag before torch loads
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
    if value in ("null", "None", "~") and not isinstance(like, (bool, int, float)):
        return None  # --megacontext.lensnet=null switches a string setting off, as `lensnet: null` in YAML does
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
    if like is None or isinstance(like, (dict, list)):
        return yaml.safe_load(value)  # best guess for keys whose default is None; mappings and lists as YAML
    return value


def load_run_config(path, overrides, defaults, sections=None, variant_flags=False):
    """
    Merge defaults <- YAML file <- overrides. `defaults` is a flat dict of known keys.
    The YAML may also hold `variant: NAME` and one mapping section per variant (its config).
    Returns (flat settings dict, variant name, variant config dict). Unknown keys are errors.
    `sections`, a dict of section name -> dict, receives the other sections the caller knows
    (e.g. {"data": {}}), with their `--data.key=value` overrides.
    variant_flags: a plain override that is not one of `defaults` goes to the variant's section
    (python -m nanochat.chat --ingest FILE = --megacontext.ingest FILE) when the run names a
    variant other than vanilla; the variant then checks its own keys.
    """
    extra_sections = {} if sections is None else sections
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
    for name in extra_sections:
        section = data.pop(name, None) or {}
        if not isinstance(section, dict):
            raise ValueError(f"config section '{name}' in {path} must be a mapping of key: value")
        extra_sections[name].update(section)
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
            if section in extra_sections and section != variant_name:
                extra_sections[section][sub] = _coerce(value, extra_sections[section].get(sub), key)
                continue
            if section != variant_name:
                raise ValueError(f"override --{key} is for variant '{section}', but this run uses '{variant_name}'")
            variant_config[sub] = _coerce(value, variant_config.get(sub), key)
            continue
        if key not in defaults and variant_flags and variant_name != "vanilla":
            variant_config[key] = _coerce(value, variant_config.get(key), key)
            continue
        if key not in defaults:
            raise ValueError(f"unknown config key '{key}' (from the command line); known keys: {', '.join(sorted(defaults))}")
        settings[key] = _coerce(value, defaults[key], key)
    return settings, variant_name, variant_config
