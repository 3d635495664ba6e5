"""
The `megacontext` variant: MegaContext's entry into nanochat's training loop.

nanochat finds make_variant by name (entry point `nanochat.variants` in pyproject.toml) when a
run config says `variant: megacontext`, and calls the members listed in nanochat/hooks.py.
A `megacontext:` section with `phases:` is end-to-end training (megacontext/end_to_end.py);
without, it is JT1, this file's MegaContextVariant: GistNet training on top of a frozen,
pretrained base model.

    python -m nanochat.train --config configs/gistnet_cpu_tiny.yaml

JT1, step by step (each micro-batch is a (B, T) row of the usual pretraining loader):
  1. window = the first context_tokens + horizon tokens of each row; with long_documents (rows
     from the run config's `data: {source: longdocs}`, each BOS + one document) the window is
     what follows the BOS, and every row the base model reads starts with that BOS, as in
     the base model's own training
  2. phase `pooling_mse` (the first pooling_mse_steps steps): the gist of each context block
     but the last (those step 3 reads as gists) is pulled towards the mean of its 32 token
     embeddings (a warm-up target). The attention and mean_linear heads are initialised to
     exactly that mean; where a head is already at the target (loss < POOLING_AT_TARGET) the
     step gets an exact zero gradient, because Adam would otherwise turn float noise of ~1e-12
     into full-size steps (measured: the loss rose to ~0.1)
  3. phase `delta_nll` (the rest): the base model reads [LOD1 gists of all context blocks but
     the last | the last block as tokens | the horizon]; the loss is the horizon NLL minus the
     NLL with the whole context as tokens, i.e. ΔNLL@H (DESIGN.md section 6), with gradients
     reaching GistNet through the frozen base model. Only the horizon tokens the trainer
     supervises are scored: all of a natural row's; of a synthetic row (data: synthetic_history
     = 1 + context_tokens puts its question at the end of the context) only the answer, the
     tokens that need the distant context. With pooling_weight > 0 the warm-up's target stays
     in the loss, weighted: ΔNLL alone, on a frozen base that gains little from any gist,
     drives every gist to one least-harmful vector (on the testbed's test documents the
     neighbouring-gist cosine went to 0.999 on natural rows and to 1.0000000 with the
     answer rows), and then LensNet cannot tell one block from another (docs/benchmarks.md).
     Both terms read the same LOD1 gists, so GistNet's LOD1 forward runs once per micro-batch.

The `megacontext:` section of the run config:
  base_model_tag / base_step   the base checkpoint to start from (base_checkpoints/<tag>; required)
  gistnet                      GistNetConfig fields except n_embd (taken from the base model)
  seed                         GistNet init seed (default 0)
  lr, weight_decay             AdamW for GistNet (scaled by nanochat's LR schedule like every group)
  pooling_mse_steps            length of the warm-up phase (default 20)
  pooling_weight               alpha: after the warm-up, loss = ΔNLL + alpha * pooling_mse (default 0)
  context_tokens, horizon      the JT1 window (context a multiple of 32; their sum <= max_seq_len)
  long_documents               the rows are BOS + one long document (see step 1; default false)
  eval_every, eval_batches     held-out ΔNLL@H every N steps on this many val batches (0 = off)
  run_name                     telemetry file name (default: the run's model tag)

What it owns: GistNet's weights, their optimizer group and checkpoint (mc_XXXXXX.pt beside
upstream's files), the JT1 losses and telemetry. It never changes the base model's weights or
nanochat's defaults; a vanilla run never touches this file.
"""

import math
import os
from dataclasses import asdict

import torch

from nanochat.common import get_base_dir, print0, get_dist_info
from megacontext import base_inputs
from megacontext.gistnet import GistNet, GistNetConfig, token_embeddings
from megacontext.losses import pooling_mse_loss, delta_nll_loss, evaluate_delta_nll
from megacontext.telemetry import Telemetry
from megacontext.tree import BLOCK_SIZE

DEFAULTS = dict(
    base_model_tag=None, base_step=None, gistnet={}, seed=0, lr=3e-3, weight_decay=0.0,
    pooling_mse_steps=20, pooling_weight=0.0, context_tokens=224, horizon=32, long_documents=False, eval_every=0, eval_batches=2,
    run_name=None,
)
POOLING_AT_TARGET = 1e-8  # pooling_mse below this: the head already is the mean pool


def make_variant(config):
    """`variant: megacontext`: the memory chat when the section says `chat: true`, end-to-end
    training when it lists phases, else JT1."""
    if (config or {}).get("chat"):
        from megacontext.memory_chat import MemoryChatVariant
        return MemoryChatVariant(config)
    if "phases" in (config or {}):
        from megacontext.end_to_end import EndToEndVariant
        return EndToEndVariant(config)
    return MegaContextVariant(config)


class MegaContextVariant:
    name = "megacontext"

    def __init__(self, config):
        self.config = merged_config(config, DEFAULTS, "megacontext")
        if self.config["context_tokens"] % BLOCK_SIZE != 0 or self.config["context_tokens"] < 2 * BLOCK_SIZE:
            raise ValueError(f"megacontext.context_tokens must be a multiple of {BLOCK_SIZE} and at least "
                             f"{2 * BLOCK_SIZE}, got {self.config['context_tokens']}")
        self.step = 0
        self.model = None
        self.gistnet = None
        self.telemetry = None
        self.val_windows = None
        self.bos = None

    # -------------------------------------------------------------------------
    # hooks called by nanochat/train.py

    def build(self, model, run_args, resuming=False):
        """Load the base weights (unless resuming: the checkpoint's are loaded already), freeze
        them, attach gist inputs, create GistNet; return its group."""
        cfg = self.config
        window = cfg["context_tokens"] + cfg["horizon"]
        # a row of the trainer holds max_seq_len + 1 tokens (x plus y's last); long-document rows spend one on BOS
        room = model.config.sequence_len + 1 - (1 if cfg["long_documents"] else 0)
        if window > room:
            raise ValueError(f"megacontext window context_tokens + horizon = {window} exceeds the {room} tokens a row "
                             f"holds (max_seq_len {model.config.sequence_len}"
                             f"{' + 1 - the BOS' if cfg['long_documents'] else ' + 1'}); lower megacontext.context_tokens "
                             f"or megacontext.horizon")
        if not resuming:
            self._load_base_weights(model, run_args)
        model.requires_grad_(False)  # JT1: the base model is frozen (hooks.drop_frozen_params takes it out)
        base_inputs.attach(model)  # before torch.compile, as base_inputs requires
        self.model = model
        gist_config = GistNetConfig(n_embd=model.config.n_embd, **cfg["gistnet"])
        self.gistnet = GistNet(gist_config).to(model.get_device()).init_weights(seed=cfg["seed"])
        print0(f"GistNet: {self.gistnet.architecture()} ({self.gistnet.num_params():,} params)")
        # LOD2 gists need whole 1024-token spans inside the replaced context; shorter windows
        # train LOD1 only, and separate LOD2 weights then stay at their init (frozen, so the
        # optimizer, which wants a gradient for every parameter, never sees them).
        self.levels = (1, 2) if cfg["context_tokens"] >= 1024 + BLOCK_SIZE else (1,)
        if 2 not in self.levels and len(self.gistnet.levels) == 2:
            self.gistnet.levels[1].requires_grad_(False)
            self.gistnet.untrained_levels = (2,)  # its identity() says so: no LOD2 gist passes as trained
            print0("GistNet: LOD2 weights not trained (context_tokens < 1056 leaves no whole 1024-token span)")
        trainable = [p for p in self.gistnet.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"GistNet head '{gist_config.head}' has no parameters to train; "
                             f"use head: attention or mean_linear")
        self.telemetry = variant_telemetry(cfg, run_args, "megacontext")
        return [dict(kind="adamw", params=trainable, lr=cfg["lr"],
                     betas=(0.9, 0.95), eps=1e-10, weight_decay=cfg["weight_decay"])]

    def _windows(self, x, y):
        """(windows (B, C + H), horizon mask (B, H) bool, bos id or None) from a micro-batch of
        the trainer. The mask is the trainer's own supervision (y != -1) of the horizon tokens:
        all of a natural row's, only the answer of a synthetic one (its filler is not a target)."""
        cfg = self.config
        rows = torch.cat([x, y[:, -1:]], dim=1)  # the whole row: x plus the token y ends with
        skip = 1 if cfg["long_documents"] else 0
        bos = int(rows[0, 0]) if cfg["long_documents"] else None
        C, H = cfg["context_tokens"], cfg["horizon"]
        # row token p is the target y[p - 1]: the horizon's tokens skip + C ... skip + C + H - 1
        horizon_mask = y[:, skip + C - 1:skip + C + H - 1] != -1
        return rows[:, skip:skip + C + H], horizon_mask, bos

    def loss(self, model, batch, step):
        """JT1 loss of one micro-batch (model is ignored: we use the uncompiled base, shapes vary)."""
        cfg = self.config
        windows, horizon_mask, bos = self._windows(*batch)
        if step < cfg["pooling_mse_steps"]:
            loss = self._pooling_loss(*self._lod1(windows))
            if loss.item() < POOLING_AT_TARGET:
                loss = loss * 0.0  # at the target already: an exact zero gradient leaves the head where it is
            return loss, {"phase": "pooling_mse"}
        scored = horizon_mask.any(dim=1)
        if not bool(scored.any()):  # no row scores a horizon token (synthetic rows whose answer lies elsewhere)
            zero = sum(p.sum() for p in self.gistnet.parameters() if p.requires_grad) * 0.0  # a graph, no push
            return zero, {"phase": "delta_nll", "rows_unscored": len(windows)}
        metrics = {"phase": "delta_nll", "rows_unscored": int((~scored).sum())}
        lod1 = None
        if cfg["pooling_weight"] > 0:  # keeps the gists apart (see step 3): the warm-up's target, weighted
            lod1, inputs = self._lod1(windows)  # the ΔNLL reads these same gists: GistNet runs once per step
            pooling = self._pooling_loss(lod1, inputs)
            metrics["pooling_mse"] = float(pooling.detach())
            lod1 = lod1[scored]
        loss = delta_nll_loss(self.model, self.gistnet, windows[scored], context_tokens=cfg["context_tokens"],
                              level=self.levels, bos=bos, horizon_mask=horizon_mask[scored], lod1=lod1)
        if cfg["pooling_weight"] > 0:
            loss = loss + cfg["pooling_weight"] * pooling
        return loss, metrics

    def _lod1(self, windows):
        """(LOD1 gists (B, n, D), their blocks' token embeddings (B * n, 32, D)) of the windows'
        context blocks but the last: the n = context_tokens / 32 - 1 blocks the ΔNLL reads as gists."""
        n = self.config["context_tokens"] // BLOCK_SIZE - 1
        blocks = windows[:, :n * BLOCK_SIZE].reshape(-1, BLOCK_SIZE)
        with torch.no_grad():
            inputs = token_embeddings(self.model, blocks)
        return self.gistnet(inputs, 1).view(windows.size(0), n, -1), inputs

    def _pooling_loss(self, lod1, inputs):
        """pooling_mse of LOD1 gists (B, n, D) against the mean of their blocks' embeddings and, when
        LOD2 trains, of each row's whole 32-gist spans against the mean of their (detached) LOD1 gists."""
        loss = pooling_mse_loss(lod1.reshape(-1, lod1.size(-1)), inputs)
        if 2 in self.levels:  # LOD2 inputs: each row's LOD1 gists, 32 at a time
            spans = lod1.detach()[:, :lod1.size(1) // BLOCK_SIZE * BLOCK_SIZE].reshape(-1, BLOCK_SIZE, lod1.size(-1))
            loss = loss + pooling_mse_loss(self.gistnet(spans, 2), spans)
        return loss

    def on_step(self, step, metrics):
        cfg = self.config
        phase = "pooling_mse" if step < cfg["pooling_mse_steps"] else "delta_nll"
        record = {"phase": phase, **metrics}
        if cfg["eval_every"] > 0 and (step + 1) % cfg["eval_every"] == 0:
            record.update({f"val_{k}": v for k, v in self.evaluate().items()})
            recovered = record["val_recovered_lod1"]
            recovered = "n/a: drop <= 0" if math.isnan(recovered) else f"{recovered:.3f}"
            print0(f"step {step:05d} | JT1 val ΔNLL@H lod1: {record['val_delta_lod1']:.4f} "
                   f"(drop {record['val_delta_drop']:.4f}, recovered {recovered})")
        self.telemetry.log(record, step=step)
        self.step = step + 1

    def state_dict(self):
        return {
            "gistnet": {"config": asdict(self.gistnet.config), "state_dict": self.gistnet.state_dict()},
            "identity": self.gistnet.identity(),
            "trained_levels": list(self.levels),  # LOD2 weights outside this list are untrained
            "step": self.step,
            "megacontext_config": self.config,
        }

    def load_state_dict(self, state):
        self.gistnet.load_state_dict(state["gistnet"]["state_dict"])
        self.step = state["step"]

    # -------------------------------------------------------------------------

    def evaluate(self):
        """ΔNLL@H on held-out windows (the val split), with the current GistNet."""
        cfg = self.config
        window = cfg["context_tokens"] + cfg["horizon"]
        if self.val_windows is None:
            from nanochat.tokenizer import get_tokenizer
            tokenizer = get_tokenizer()
            if cfg["long_documents"]:
                from megacontext.window_loader import window_batches
                # natural rows: a synthetic row's tail is filler its base model was not trained to predict
                loader = window_batches(tokenizer, 4, 1, window, split="val", device=self.model.get_device(), seed=1,
                                        mixture={"natural": 1.0})
                self.val_windows = [next(loader)[1].clone() for _ in range(cfg["eval_batches"])]
            else:
                from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
                loader = tokenizing_distributed_data_loader_bos_bestfit(
                    tokenizer, 4, window, split="val", device=self.model.get_device())
                self.val_windows = [next(loader)[0].clone() for _ in range(cfg["eval_batches"])]
            self.bos = tokenizer.get_bos_token_id() if cfg["long_documents"] else None
        documents = [row for batch in self.val_windows for row in batch]
        self.gistnet.eval()
        with torch.no_grad():
            result = evaluate_delta_nll(self.model, self.gistnet, documents, context_tokens=cfg["context_tokens"],
                                        horizon=cfg["horizon"], stride=cfg["context_tokens"] + cfg["horizon"],
                                        bos=self.bos)
        self.gistnet.train()
        return result

    def _load_base_weights(self, model, run_args):
        load_base_weights(model, self.config["base_model_tag"], self.config["base_step"], run_args, section="megacontext",
                          example="base_model_tag: cpu_tiny after `python -m nanochat.train --config configs/cpu_tiny.yaml`")

# -----------------------------------------------------------------------------
# Config and telemetry shared by the MegaContext variants (JT1 here, JT2 in lens_training.py,
# end-to-end training in end_to_end.py)


def merged_config(config, defaults, section):
    """defaults <- config, refusing keys the variant does not know (one line listing the known ones)."""
    unknown = set(config) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {section} config key(s): {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(defaults))}")
    return {**defaults, **config}


def variant_telemetry(cfg, run_args, section):
    """The run's telemetry JSONL (rank 0 only), named by run_name or the model tag. It opens no
    wandb run: the trainer logs loss()'s metrics to its own."""
    run_name = cfg["run_name"] or (run_args.get("model_tag") or f"d{run_args.get('depth')}")
    return Telemetry(run_name, config={section: cfg, "train": run_args}, enabled=get_dist_info()[1] == 0, wandb=False)


# -----------------------------------------------------------------------------
# Checkpoints shared by the MegaContext variants (JT1 here, JT2 in lens_training.py)


def load_base_weights(model, tag, step, run_args, section, example):
    """Load base_checkpoints/<tag> (step None = the last) into the run's model, which must have its
    shape; `section` names the config section in errors and `example` shows a valid setting."""
    from nanochat.checkpoint_manager import load_checkpoint, find_last_step
    if not tag:
        raise ValueError(f"{section}.base_model_tag is required: this variant trains on a pretrained, frozen base "
                         f"model (e.g. {example})")
    if tag == run_args.get("model_tag"):
        raise ValueError(f"model_tag '{tag}' would overwrite the base checkpoint; give the {section} run its own model_tag")
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, model.get_device(), load_optimizer=False)
    mine = asdict(model.config)
    mismatch = {k: (mine.get(k), v) for k, v in meta["model_config"].items() if mine.get(k) != v}
    if mismatch:
        raise ValueError(f"the run's model does not match base checkpoint {checkpoint_dir} step {step}: "
                         + ", ".join(f"{k} run={a} checkpoint={b}" for k, (a, b) in mismatch.items())
                         + "; set depth/aspect_ratio/head_dim/max_seq_len/window_pattern to the base run's")
    model.load_state_dict(model_data, strict=True)
    print0(f"{section}: base weights from {checkpoint_dir} step {step} (frozen)")


def last_mc_file(spec, what, make_command):
    """An mc_XXXXXX.pt path as given, or a run's model tag -> base_checkpoints/<tag>/mc_<last step>.pt.
    Nothing there: FileNotFoundError naming `what` and the command that makes it."""
    path = os.path.expanduser(str(spec))
    if os.path.isfile(path):
        return path
    if path.endswith(".pt") or os.sep in path:
        raise FileNotFoundError(f"{what}: {path} does not exist; give an mc_XXXXXX.pt file or a run's model tag "
                                f"(train one with `{make_command}`)")
    ckpt_dir = os.path.join(get_base_dir(), "base_checkpoints", path)
    steps = sorted(int(f[3:-3]) for f in os.listdir(ckpt_dir) if f.startswith("mc_") and f.endswith(".pt")) \
        if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise FileNotFoundError(f"no {what} (mc_XXXXXX.pt) under {ckpt_dir}; train one with `{make_command}`")
    return os.path.join(ckpt_dir, f"mc_{steps[-1]:06d}.pt")
