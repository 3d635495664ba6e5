"""
End-to-end MegaContext training: GistNet, LensNet and, by choice, the base model (whole or
through a LoRA) learning together inside nanochat.train, in phases and EM cycles.

    python -m nanochat.train --config configs/megacontext_cpu.yaml          # one process
    torchrun --nproc_per_node=8 -m nanochat.train --config configs/megacontext_d20_8xh100.yaml

A run config selects it with `variant: megacontext` and a `phases:` list in its `megacontext:`
section (without `phases` the section is JT1, megacontext/variant.py). One micro-batch:
  1. B rows of the variant's own loader (train_loader: BOS + one long document each, from the
     testbed's long-document mixture, window_loader.example_batches); per row a history and
     a horizon (window_loader.history_horizon: a synthetic row's horizon holds its answer)
  2. LOD1 gists of every whole history block and LOD2 gists of every whole 1024-token span,
     from the current GistNet, differentiable when the phase trains it
  3. per row the WCs of budget W: the recency baseline, `random_wcs` random LOD mixes, and
     `focused_wcs` refocused by LensNet + the Focus Allocator from the recency WC
  4. the base model reads [BOS | WC | horizon] for every WC of the micro-batch in ONE batch of
     fixed shape (B * WCs per row, 1 + W + H - 1) — the compiled model runs it — and the
     horizon loss is each WC's mean NLL over its scored horizon tokens
  5. gist auxiliary losses: each LOD1 gist to the mean of its block's token embeddings, each
     LOD2 gist to the mean of its 32 LOD1 gists (losses.pooling_mse_loss), weights alpha_lod1
     and alpha_lod2
  6. LensNet targets on the recency WC: `argmin` (regularized argmin over this step's WC
     variants: where the WC that lost least is more detailed than the recency WC an entry's
     target is +gain, where it is coarser -gain, gain = NLL(recency) - NLL(best) in nats, and
     all targets are 0 when the gain is under argmin_margin) or `counterfactual` (the focus
     issue's utilities, lens_targets.counterfactual_targets, max_candidates per WC); LensNet's
     loss = w_regression * regression + w_ranking * ranking + w_budget * budget (lens_losses)
  7. full-context replay (w_full_context > 0, in phases that train the LoRA or the base): the
     first full_context_rows rows of each micro-batch (null = all) read whole as plain tokens,
     no WC, scored on their supervised tokens as the testbed was pre-trained: each row's mean
     NLL, then the mean over rows. A LoRA that learns to read gists only ever sees WC rows of 1 + W + H - 1 positions, and
     without this its reading of long raw-token contexts drifts (docs/benchmarks.md, part 9)
  8. loss = mean horizon NLL (when the phase trains GistNet, LoRA or the base) + the gist
     losses + w_lens * LensNet's loss (when it trains LensNet) + w_full_context * the replay
     loss (when it is on). The trainer steps once.
Targets are computed every step from the current GistNet, so they are always regenerated
after a GistNet phase.

Phases. `phases` is a list of {name, steps, train}: train lists what learns in the phase,
among gistnet, lensnet, lora and base; `cycles` repeats the list (EM cycles: e.g. gist ->
lens -> lora, twice). The run's num_iterations should equal cycles * sum(steps); after the
last phase the last one goes on. Modules outside a phase's `train` get no gradient, and the
trainer lets their optimizer groups sit the step out (nanochat/hooks.py).

The `megacontext:` section (DEFAULTS below lists every key):
  base_model_tag / base_step   the base checkpoint to start from (required)
  gistnet, lensnet             a JT1 / JT2 run's model tag (its last mc_XXXXXX.pt) or an mc path to
                               start from; null = fresh (gistnet_config / lensnet_config fields)
  lora                         {rank, alpha, targets, seed} (megacontext/lora.py), used by phases
                               that train `lora`
  phases, cycles               see above
  budget_tokens, history_tokens, horizon, min_history, answer_tokens, mixture, data_seed
  corpus                       null = the offline long documents (megacontext/longdocs.py); or a real
                               corpus through `datasets` (longdocs.hf_documents' arguments, e.g.
                               {path: emozilla/pg19, text_key: text}), split by document as the offline one
  random_wcs, focused_wcs, refocus_changes, lod1_tail
  alpha_lod1, alpha_lod2, w_lens, lens_target, argmin_margin, max_candidates, batch_rows,
  target_scale, ranking_temperature, w_regression, w_ranking, w_budget
  w_full_context, full_context_rows   the full-context replay loss of step 7 (0 = off, the default)
  lr_gistnet, lr_lensnet, lr_lora, weight_decay   AdamW groups under nanochat's LR schedule (the
                               base's own groups keep nanochat's LRs when a phase trains it)
  max_nonfinite_steps          NaN/inf steps skipped in a row before the run stops (nanochat/hooks.py)
  megaprediction               null (off: nothing below happens) or the MegaPrediction heads' settings,
                               e.g. {lod1: 1.0, lod2: 0.5}; MEGAPREDICTION_DEFAULTS lists the keys
  seed, run_name

Checkpoints: mc_XXXXXX.pt beside upstream's files holds GistNet (the keys JT1 files have, so
the eval harness and the runtime read it as a GistNet), LensNet (as a JT2 file, with the
GistNet identity), the LoRA under its own `lora.` key prefix, the shapes, and the step; the
base model's weights (trained or not) are the trainer's model_XXXXXX.pt, upstream's format.
Resuming with other MegaContext shapes than the checkpoint's is refused, naming both.

MegaPrediction (megacontext/megaprediction.py), when `megaprediction` is set. Heads that predict,
from the base model's final hidden state at a block end, the GistNet gist of the next block (LOD1)
and of the next 1024 tokens (LOD2), trained at every step of every phase, beside the step above
and without touching it:
  - data: the LOD2 target needs 1024 tokens after the position, more than a row holds after most
    of its block ends (a row is BOS + history + horizon). So the heads read longer windows from
    the same loader: per row id of the batch, row `id` of a RowStream like the variant's own (same
    split, mixture, data seed, corpus) whose rows are BOS + context_tokens + 1024 tokens; the
    base model reads BOS + the first context_tokens tokens (token path, no WC; context_tokens
    defaults to history_tokens + horizon, capped to fit max_seq_len, in whole blocks) and the last
    1024 tokens serve the targets only. Every block end k = 1 .. context_tokens / 32 of the read
    part is a position with both targets. Rows are a pure function of their id, so a resumed run
    reads the same windows.
  - features and targets are detached (features in eval mode, targets under no_grad): the heads'
    loss reaches only the heads, no random number is drawn for them, and GistNet, LensNet, the
    LoRA and the base train exactly as with megaprediction off (tested).
  - loss: lod1 * L(LOD1) + lod2 * L(LOD2), L = w_cos (1 - cos) + w_mse MSE (megaprediction_loss),
    means over positions; logged as mp_lod1, mp_lod2, mp_cos_lod1, mp_cos_lod2 and the copy-last
    baseline's mp_copy_cos_lod1 (its LOD2 twin only exists from block end 32 on: mp_copy_cos_lod2).
  - optimizer: one AdamW group per level (lr, under the trainer's LR schedule; a level whose weight
    is 0 gets no gradient and its group sits out); the heads are saved in mc_XXXXXX.pt under the
    `megaprediction.` key prefix, with `megaprediction_config` (head shape and context_tokens) and
    the resume shapes; megacontext.eval reads them back (`megaprediction:` in its config).
With megaprediction off the step, its losses, its metrics and the mc file's keys are unchanged.

What it owns: the end-to-end step, its phases and its checkpoint. It never edits nanochat and
never defines the losses or the layouts it uses (losses.py, lens_targets.py, working_context.py).
"""

import time
from dataclasses import asdict

import numpy as np
import torch

from nanochat.common import print0
from megacontext import base_inputs
from megacontext.allocator import AllocatorConfig, FocusAllocator
from megacontext.gistnet import GistNet, GistNetConfig, history_gists, token_embeddings
from megacontext.lens_targets import counterfactual_targets, item_store, lens_losses, lens_scores, masked_horizon_nll
from megacontext.lensnet import LensNet, LensNetConfig, tail_gists_of, mask_illegal
from megacontext.losses import pooling_mse_loss
from megacontext.megaprediction import (LOD2_TOKENS, MegaPrediction, MegaPredictionConfig, megaprediction_loss,
                                        training_examples)
from megacontext.tree import BLOCK_SIZE
from megacontext.variant import last_mc_file, load_base_weights, merged_config, variant_telemetry
from megacontext.window_loader import DEFAULT_MIXTURE, example_batches, history_horizon
from megacontext.working_context import TensorStore, WorkingContext

MODULES = ("gistnet", "lensnet", "lora", "base")
LENS_TARGETS = ("argmin", "counterfactual")
DEFAULTS = dict(
    base_model_tag=None, base_step=None, gistnet=None, gistnet_config={}, lensnet=None, lensnet_config={},
    lora={}, phases=None, cycles=1,
    budget_tokens=128, history_tokens=1024, horizon=32, min_history=160, answer_tokens=6,
    mixture=None, data_seed=0, corpus=None, random_wcs=1, focused_wcs=1, refocus_changes=4, lod1_tail=256,
    alpha_lod1=0.1, alpha_lod2=0.1, w_lens=1.0, lens_target="argmin", argmin_margin=0.01, max_candidates=8,
    batch_rows=32, target_scale=10.0, ranking_temperature=1.0, w_regression=1.0, w_ranking=1.0, w_budget=0.1,
    w_full_context=0.0, full_context_rows=None,
    lr_gistnet=1e-3, lr_lensnet=1e-3, lr_lora=1e-3, weight_decay=0.0, max_nonfinite_steps=3,
    seed=0, run_name=None, megaprediction=None,
)
MEGAPREDICTION_DEFAULTS = dict(lod1=1.0, lod2=0.5, w_cos=1.0, w_mse=1.0, head="mlp", hidden_mult=2, lr=1e-3,
                               context_tokens=None)


def check_megaprediction(spec):
    """The `megaprediction` setting -> None (off) or the full dict, or ValueError naming the problem."""
    if spec is None or spec is False:
        return None
    example = "e.g. megaprediction: {lod1: 1.0, lod2: 0.5}"
    if not isinstance(spec, dict):
        raise ValueError(f"megacontext.megaprediction must be a mapping of settings or null, got {spec!r}; {example}")
    unknown = set(spec) - set(MEGAPREDICTION_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown megacontext.megaprediction key(s): {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(MEGAPREDICTION_DEFAULTS)}")
    mp = {**MEGAPREDICTION_DEFAULTS, **spec}
    for key in ("lod1", "lod2", "w_cos", "w_mse", "lr"):
        if not isinstance(mp[key], (int, float)) or isinstance(mp[key], bool) or mp[key] < 0:
            raise ValueError(f"megacontext.megaprediction.{key} must be a number >= 0, got {mp[key]!r}")
    if mp["lod1"] == 0 and mp["lod2"] == 0:
        raise ValueError(f"megacontext.megaprediction needs lod1 > 0 or lod2 > 0 (the loss weights); {example}, "
                         f"or set megaprediction: null to turn the heads off")
    ctx = mp["context_tokens"]
    if ctx is not None and (not isinstance(ctx, int) or ctx < BLOCK_SIZE or ctx % BLOCK_SIZE):
        raise ValueError(f"megacontext.megaprediction.context_tokens must be a positive multiple of {BLOCK_SIZE} "
                         f"or null, got {ctx!r}")
    MegaPredictionConfig(n_embd=1, head=mp["head"], hidden_mult=mp["hidden_mult"])  # checks head and hidden_mult
    return mp


def check_phases(phases, cycles):
    """The phases list as [(name, steps, frozenset(train))], or ValueError naming the problem."""
    if not isinstance(phases, list) or not phases:
        raise ValueError("megacontext.phases must be a non-empty list of {name, steps, train}, e.g. "
                         "[{name: joint, steps: 100, train: [gistnet, lensnet]}]")
    out = []
    for k, phase in enumerate(phases):
        if not isinstance(phase, dict) or set(phase) - {"name", "steps", "train"} or "steps" not in phase:
            raise ValueError(f"megacontext.phases[{k}] must be a mapping with keys name, steps, train; got {phase!r}")
        train = phase.get("train") or []
        train = [train] if isinstance(train, str) else list(train)
        unknown = set(train) - set(MODULES)
        if unknown or not train:
            raise ValueError(f"megacontext.phases[{k}].train must list some of {', '.join(MODULES)}; got {train!r}")
        if not isinstance(phase["steps"], int) or phase["steps"] < 1:
            raise ValueError(f"megacontext.phases[{k}].steps must be a positive integer, got {phase['steps']!r}")
        out.append((str(phase.get("name", f"phase{k}")), phase["steps"], frozenset(train)))
    if not isinstance(cycles, int) or cycles < 1:
        raise ValueError(f"megacontext.cycles must be a positive integer, got {cycles!r}")
    return out


def phase_at(phases, cycles, step):
    """(cycle, phase index, (name, steps, train)) of an optimizer step; past the end, the last phase."""
    period = sum(steps for _, steps, _ in phases)
    cycle, offset = divmod(step, period)
    if cycle >= cycles:
        return cycles - 1, len(phases) - 1, phases[-1]
    for k, phase in enumerate(phases):
        if offset < phase[1]:
            return cycle, k, phase
        offset -= phase[1]
    raise AssertionError("unreachable")


def attach_trained_lora(model, spec):
    """Attach the LoRA an end-to-end run trained (its model tag, or an mc_XXXXXX.pt path) to model,
    in eval mode. Returns (lora, path); ValueError when that run trained no LoRA."""
    from megacontext.lora import LoRAConfig, attach_lora
    path = last_mc_file(spec, f"LoRA at {spec}", "python -m nanochat.train --config configs/megacontext_cpu.yaml")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = state.get("lora") if isinstance(state, dict) else None
    if not saved:
        raise ValueError(f"{path} holds no LoRA (its run trained none); drop the lora setting")
    saved = {k[len("lora."):]: v for k, v in saved.items()}
    lora = attach_lora(model, **asdict(LoRAConfig.from_state_dict(saved)))
    lora.load_state_dict(saved)
    return lora.eval(), path


def detail_targets(wc, best, gain, margin):
    """Regularized-argmin targets on wc's entries (n,) float32: +gain where `best` (another WC of the
    same history) holds an entry's span in finer detail, -gain where coarser, 0 elsewhere (or
    everywhere when gain < margin); NaN where that action is illegal."""
    n = len(wc)
    out = np.zeros(n, dtype=np.float32)
    if gain < margin:
        return out
    spans, best_spans, best_levels = wc.spans, best.spans, best.levels
    for k, e in enumerate(wc.entries):
        overlap = (best_spans[:, 0] < spans[k, 1]) & (best_spans[:, 1] > spans[k, 0])
        finest = int(best_levels[overlap].min()) if overlap.any() else e.level
        if finest < e.level:
            out[k] = gain
        elif finest > e.level:
            out[k] = -gain
    can_expand, can_collapse = wc.levels > 0, wc.collapsible_mask()
    out[(out > 0) & ~can_expand] = np.nan
    out[(out < 0) & ~can_collapse] = np.nan
    return out


class EndToEndVariant:
    name = "megacontext"

    def __init__(self, config):
        cfg = self.config = merged_config(config, DEFAULTS, "megacontext")
        self.phases = check_phases(cfg["phases"], cfg["cycles"])
        if cfg["lens_target"] not in LENS_TARGETS:
            raise ValueError(f"megacontext.lens_target must be one of {', '.join(LENS_TARGETS)}, got {cfg['lens_target']!r}")
        if cfg["budget_tokens"] < 2 * BLOCK_SIZE:
            raise ValueError(f"megacontext.budget_tokens must be at least {2 * BLOCK_SIZE}, got {cfg['budget_tokens']}")
        if not (BLOCK_SIZE <= cfg["min_history"] <= cfg["history_tokens"]):
            raise ValueError(f"megacontext needs {BLOCK_SIZE} <= min_history <= history_tokens, got "
                             f"min_history={cfg['min_history']}, history_tokens={cfg['history_tokens']}")
        if cfg["horizon"] < 1 or cfg["random_wcs"] < 0 or cfg["focused_wcs"] < 0:
            raise ValueError("megacontext.horizon must be >= 1 and random_wcs, focused_wcs >= 0")
        w_full, full_rows = cfg["w_full_context"], cfg["full_context_rows"]
        if isinstance(w_full, bool) or not isinstance(w_full, (int, float)) or not w_full >= 0:
            raise ValueError(f"megacontext.w_full_context must be a number >= 0 (0 = off), got {w_full!r}")
        if full_rows is not None and (isinstance(full_rows, bool) or not isinstance(full_rows, int) or full_rows < 1):
            raise ValueError(f"megacontext.full_context_rows must be a positive integer or null (all rows), got {full_rows!r}")
        self.max_nonfinite_steps = int(cfg["max_nonfinite_steps"])  # opts into the trainer's NaN/inf guard
        self.mp = check_megaprediction(cfg["megaprediction"])
        self.heads = self.mp_stream = None
        self.mp_context = None  # tokens the heads' pass reads per row (set by build)
        self.trains = frozenset().union(*(train for _, _, train in self.phases))
        self.model = self.gistnet = self.lensnet = self.lora = self.telemetry = None
        self.step = 0
        self.last_metrics = {}
        self.current_phase = None

    @property
    def wcs_per_row(self):
        return 1 + self.config["random_wcs"] + self.config["focused_wcs"]

    @property
    def row_length(self):
        """Positions of one base-model row: BOS + W slots + H - 1 horizon inputs (fixed)."""
        return 1 + self.config["budget_tokens"] + self.config["horizon"] - 1

    def shapes(self):
        """What a checkpoint of this run must match to be resumed."""
        cfg = self.config
        shapes = {"gistnet": asdict(self.gistnet.config), "lensnet": asdict(self.lensnet.config),
                  "lora": None if self.lora is None else self.lora.config.to_dict(),
                  "budget_tokens": cfg["budget_tokens"], "history_tokens": cfg["history_tokens"], "horizon": cfg["horizon"]}
        if self.heads is not None:  # absent when off, so an off run's shapes are what they always were
            shapes["megaprediction"] = {**asdict(self.heads.config), "context_tokens": self.mp_context}
        return shapes

    # -------------------------------------------------------------------------
    # hooks called by nanochat/train.py

    def build(self, model, run_args, resuming=False):
        """Load the base weights (unless resuming), attach gist inputs (and a LoRA when a phase
        trains one), create or load GistNet and LensNet; return their optimizer groups."""
        from megacontext.ingest import load_gister
        cfg = self.config
        need = self.row_length
        if need > model.config.sequence_len:
            raise ValueError(f"megacontext rows need 1 + budget_tokens + horizon - 1 = {need} positions but the model's "
                             f"max_seq_len is {model.config.sequence_len}; lower megacontext.budget_tokens or horizon, "
                             f"or raise max_seq_len")
        full = cfg["history_tokens"] + cfg["horizon"]  # the replay reads a whole row but its last token
        if cfg["w_full_context"] and full > model.config.sequence_len:
            raise ValueError(f"megacontext.w_full_context reads whole rows of history_tokens + horizon = {full} positions "
                             f"but the model's max_seq_len is {model.config.sequence_len}; lower history_tokens or "
                             f"horizon, raise max_seq_len, or set w_full_context: 0")
        if not resuming:
            load_base_weights(model, cfg["base_model_tag"], cfg["base_step"], run_args, section="megacontext",
                              example="base_model_tag: longctx_cpu after `python -m nanochat.train --config "
                                      "configs/longctx_cpu.yaml`")
        # the base stays in the optimizer only when some phase trains it (hooks.drop_frozen_params)
        model.requires_grad_("base" in self.trains)
        base_inputs.attach(model)  # before torch.compile
        self.model = model
        device = model.get_device()
        n_embd = model.config.n_embd
        if cfg["gistnet"]:
            path = last_mc_file(cfg["gistnet"], f"GistNet for megacontext.gistnet '{cfg['gistnet']}'",
                                "python -m nanochat.train --config configs/gistnet_longctx_cpu.yaml")
            self.gistnet = load_gister(path, n_embd, device)
            self.gistnet.untrained_levels = ()  # this run trains every level it uses
        else:
            self.gistnet = GistNet(GistNetConfig(n_embd=n_embd, **cfg["gistnet_config"])).to(device).init_weights(seed=cfg["seed"])
        if cfg["lensnet"]:
            from megacontext.lensnet import load_lensnet
            self.lensnet = load_lensnet(cfg["lensnet"], n_embd, device)
        else:
            self.lensnet = LensNet(LensNetConfig(n_embd=n_embd, **cfg["lensnet_config"])).init_weights(seed=cfg["seed"]).to(device)
        self.gistnet.train()
        self.lensnet.train()
        # one group per GistNet level (a step whose histories hold no whole 1024-token span gives
        # separate LOD2 weights no gradient: their group sits that step out) and one for LensNet
        adamw = lambda params, lr: dict(kind="adamw", params=list(params), lr=lr, betas=(0.9, 0.95), eps=1e-10,
                                        weight_decay=cfg["weight_decay"])
        groups = [adamw(level.parameters(), cfg["lr_gistnet"]) for level in self.gistnet.levels]
        groups.append(adamw(self.lensnet.parameters(), cfg["lr_lensnet"]))
        if "lora" in self.trains:
            from megacontext.lora import attach_lora
            self.lora = attach_lora(model, **cfg["lora"])  # after base_inputs, before torch.compile
            groups.append(adamw(self.lora.parameters(), cfg["lr_lora"]))
        if self.mp is not None:
            self._build_heads(model, groups, adamw)
        # nanochat's fused AdamW step is compiled once per parameter shape, and torch.compile stops at
        # recompile_limit (8) shapes: GistNet, LensNet and the LoRA bring more, so the limit grows by theirs
        shapes = {(tuple(p.shape), p.dtype) for g in groups for p in g["params"]}
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(shapes) + 8)
        print0(f"MegaContext end to end: GistNet {self.gistnet.architecture()} ({self.gistnet.num_params():,} params), "
               f"LensNet ({self.lensnet.num_params():,} params)"
               + (f", LoRA rank {self.lora.config.rank} ({self.lora.num_params():,} params)" if self.lora else "")
               + "; phases " + " -> ".join(f"{n} {s} [{'+'.join(sorted(t))}]" for n, s, t in self.phases)
               + f" x {cfg['cycles']}; {self.wcs_per_row} WCs per row of {self.row_length} positions"
               + ("" if self.heads is None else f"; MegaPrediction {self.heads.config.head} heads "
                  f"({self.heads.num_params():,} params) on {self.mp_context // BLOCK_SIZE} block ends per row"))
        self.telemetry = variant_telemetry(cfg, run_args, "megacontext")
        self.allocator = FocusAllocator(AllocatorConfig(tau_expand=0.0, tau_collapse=0.0, max_changes=cfg["refocus_changes"],
                                                        cooldown=0, hysteresis=0.0))
        return groups

    def train_loader(self, tokenizer, B, T, device, resume_state_dict):
        """Rows of BOS + history_tokens + horizon tokens of one long document (the trainer's T is
        not used: the base model reads WCs of row_length positions)."""
        cfg = self.config
        self.bos = tokenizer.get_bos_token_id()
        mixture = cfg["mixture"] or DEFAULT_MIXTURE
        corpus = None
        if cfg["corpus"]:
            from megacontext.longdocs import TokenCorpus, documents_for_split, hf_documents
            documents = documents_for_split(list(hf_documents(**cfg["corpus"])), "train")
            if not documents:
                raise ValueError(f"megacontext.corpus {cfg['corpus']} has no train documents")
            corpus = TokenCorpus.from_documents(documents, tokenizer)
            print0(f"megacontext: {len(documents)} train documents from {cfg['corpus'].get('path')}")
        if self.mp is not None:  # the heads' longer windows: same loader, same row ids (module docstring)
            from megacontext.window_loader import RowStream
            self.mp_stream = RowStream(tokenizer, 1 + self.mp_context + LOD2_TOKENS, "train", mixture, cfg["data_seed"],
                                       corpus=corpus)
        return example_batches(tokenizer, B, 1 + cfg["history_tokens"] + cfg["horizon"], "train", device, mixture,
                               cfg["data_seed"], resume_state_dict, corpus=corpus)

    def _set_phase(self, step):
        cycle, k, (name, _, train) = phase_at(self.phases, self.config["cycles"], step)
        self.gistnet.requires_grad_("gistnet" in train)
        self.lensnet.requires_grad_("lensnet" in train)
        if self.lora is not None:
            self.lora.requires_grad_("lora" in train)
        if "base" in self.trains:
            for p in self.model.parameters():
                p.requires_grad_("base" in train)
        if self.current_phase != (cycle, k):
            print0(f"megacontext: step {step} starts phase '{name}' (cycle {cycle + 1}/{self.config['cycles']}), "
                   f"training {', '.join(sorted(train))}")
            self.current_phase = (cycle, k)
        return name, train

    def loss(self, model, batch, step):
        cfg = self.config
        name, train = self._set_phase(step)
        rows, (supervised, row_ids) = batch
        t0 = time.time()
        examples = [history_horizon(rows[r], supervised[r], cfg["history_tokens"], cfg["horizon"], cfg["min_history"],
                                    cfg["answer_tokens"]) for r in range(rows.size(0))]
        lod = self._gists([h for h, _, _ in examples], grad="gistnet" in train)
        items = self._wcs(examples, lod, row_ids)
        t_wcs = time.time() - t0
        reads_gists = bool(train & {"gistnet", "lora", "base"})
        with torch.set_grad_enabled(reads_gists):
            nll = self._horizon_nll(model, items)  # (R,) one per WC
        # every mean below is over WCs (or rows) with equal weight, so B rows on one rank and B/2 on each
        # of two ranks give the same step
        horizon_loss = nll.mean()
        loss = horizon_loss if reads_gists else horizon_loss.detach() * 0.0
        metrics = {"phase": name}
        if "gistnet" in train and (cfg["alpha_lod1"] or cfg["alpha_lod2"]):
            aux1, aux2 = self._gist_losses(examples, lod)
            loss = loss + cfg["alpha_lod1"] * aux1 + cfg["alpha_lod2"] * aux2
            metrics.update(gist_lod1=float(aux1.detach()), gist_lod2=float(aux2.detach()))
        t_lens = time.time()
        if "lensnet" in train:
            parts, target_stats = self._lens_loss(items, nll.detach())
            lens_loss = cfg["w_regression"] * parts["regression"] + cfg["w_ranking"] * parts["ranking"] + cfg["w_budget"] * parts["budget"]
            loss = loss + cfg["w_lens"] * lens_loss
            metrics.update({f"lens_{k}": float(v.detach()) for k, v in parts.items()}, **target_stats)
        lens_s = time.time() - t_lens
        replay_rows, t_replay = 0, time.time()
        if cfg["w_full_context"] and train & {"lora", "base"}:
            replay_rows = min(cfg["full_context_rows"] or rows.size(0), rows.size(0))
            full_nll = self._full_context_nll(model, rows[:replay_rows], supervised[:replay_rows])
            loss = loss + cfg["w_full_context"] * full_nll
            metrics.update(nll_full_context=float(full_nll.detach()), replay_s=round(time.time() - t_replay, 3))
        per_kind = {}
        for it, v in zip(items, nll.detach().float().cpu().tolist()):
            per_kind.setdefault(it["kind"], []).append(v)
        metrics.update({f"nll_{k}": float(np.nanmean(v)) for k, v in per_kind.items()})
        if "focused" in per_kind:
            metrics["focus_gain"] = metrics["nll_recency"] - metrics["nll_focused"]
        metrics.update(tokens=len(items) * self.row_length + replay_rows * (rows.size(1) - 1), wcs_s=round(t_wcs, 3), lens_s=round(lens_s, 3))
        if self.heads is not None:  # last, so everything above runs exactly as with the heads off
            mp_loss, mp_metrics = self._megaprediction_loss(model, row_ids)
            loss = loss + mp_loss
            metrics.update(mp_metrics)
        self.last_metrics = metrics
        return loss, metrics

    def on_step(self, step, metrics):
        record = {**self.last_metrics, **metrics, "nonfinite_skipped": getattr(self, "nonfinite_skipped", 0)}
        self.telemetry.log(record, step=step)
        self.step = step + 1

    def finish(self):
        if self.telemetry is not None:
            self.telemetry.close()

    def state_dict(self):
        gistnet_identity = self.gistnet.identity()
        state = {
            "gistnet": {"config": asdict(self.gistnet.config), "state_dict": self.gistnet.state_dict()},
            "identity": gistnet_identity,
            "trained_levels": [1, 2],
            "lensnet": {"config": asdict(self.lensnet.config), "state_dict": self.lensnet.state_dict()},
            "gistnet_identity": gistnet_identity,
            "lora": None if self.lora is None else {f"lora.{k}": v for k, v in self.lora.state_dict().items()},
            "shapes": self.shapes(),
            "step": self.step,
            "megacontext_config": self.config,
        }
        if self.heads is not None:  # only when on: an off run's file has exactly the keys it always had
            state["megaprediction"] = self.heads.state_dict_prefixed()
            state["megaprediction_config"] = {**asdict(self.heads.config), "context_tokens": self.mp_context,
                                              **{k: self.mp[k] for k in ("lod1", "lod2", "w_cos", "w_mse")}}
        return state

    def load_state_dict(self, state):
        mine = self.shapes()
        theirs = state.get("shapes")
        if theirs != mine:
            keys = list(mine) + [k for k in (theirs if isinstance(theirs, dict) else {}) if k not in mine]
            diff = {k: (theirs.get(k) if isinstance(theirs, dict) else None, mine.get(k)) for k in keys
                    if not isinstance(theirs, dict) or theirs.get(k) != mine.get(k)}
            raise ValueError("cannot resume: the checkpoint's MegaContext shapes differ from this run's: "
                             + "; ".join(f"{k}: checkpoint {a} vs run {b}" for k, (a, b) in diff.items())
                             + " (resume with the config the checkpoint was trained with)")
        self.gistnet.load_state_dict(state["gistnet"]["state_dict"])
        self.lensnet.load_state_dict(state["lensnet"]["state_dict"])
        if self.lora is not None:
            self.lora.load_state_dict({k[len("lora."):]: v for k, v in state["lora"].items()})
        if self.heads is not None:
            self.heads.load_prefixed(state["megaprediction"])
        self.step = state["step"]

    # -------------------------------------------------------------------------
    # the step's pieces

    def _build_heads(self, model, groups, adamw):
        """Create the MegaPrediction heads and append their groups (one per level) to groups."""
        cfg, mp = self.config, self.mp
        room = (model.config.sequence_len - 1) // BLOCK_SIZE * BLOCK_SIZE  # BOS + read tokens must fit the model
        wanted = mp["context_tokens"] or (cfg["history_tokens"] + cfg["horizon"]) // BLOCK_SIZE * BLOCK_SIZE
        if mp["context_tokens"] and mp["context_tokens"] > room:
            raise ValueError(f"megacontext.megaprediction.context_tokens={mp['context_tokens']} plus the BOS exceeds the "
                             f"model's max_seq_len {model.config.sequence_len}; use at most {room}")
        self.mp_context = min(wanted, room)
        if self.mp_context < BLOCK_SIZE:
            raise ValueError(f"megaprediction needs at least one {BLOCK_SIZE}-token block of context, but the model's "
                             f"max_seq_len is {model.config.sequence_len}")
        config = MegaPredictionConfig(n_embd=model.config.n_embd, head=mp["head"], hidden_mult=mp["hidden_mult"])
        self.heads = MegaPrediction(config).init_weights(seed=cfg["seed"]).to(model.get_device()).train()
        groups.extend(adamw(level.parameters(), mp["lr"]) for level in self.heads.levels)

    def _megaprediction_loss(self, model, row_ids):
        """The heads' loss on the longer windows of this micro-batch's rows, and its metrics."""
        mp = self.mp
        device = self.model.get_device()
        long_rows = torch.from_numpy(np.stack([self.mp_stream.row(int(r))[0] for r in row_ids.tolist()])).to(device)
        ex = training_examples(model, self.gistnet, long_rows, self.mp_context // BLOCK_SIZE)
        metrics, loss = {}, None
        for level, key in ((1, "lod1"), (2, "lod2")):
            if not mp[key]:
                continue  # no gradient: the level's group sits the step out
            part, cos = megaprediction_loss(self.heads(ex["hidden"], level), ex[key], mp["w_cos"], mp["w_mse"])
            loss = mp[key] * part if loss is None else loss + mp[key] * part
            metrics.update({f"mp_{key}": float(part.detach()), f"mp_cos_{key}": float(cos.mean())})
        cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8).mean())
        metrics["mp_copy_cos_lod1"] = cos(ex["copy_lod1"], ex["lod1"])
        if bool(ex["copy_lod2_mask"].any()):
            m = ex["copy_lod2_mask"]
            metrics["mp_copy_cos_lod2"] = cos(ex["copy_lod2"][:, m], ex["lod2"][:, m])
        return loss, metrics

    def _gists(self, histories, grad):
        """Per history dict(lod1 (n_blocks, D), lod2 (n_groups, D), inputs) in fp32, differentiable when grad."""
        with torch.set_grad_enabled(grad):
            return [dict(lod1=lod1, lod2=lod2, inputs=inputs)
                    for lod1, lod2, inputs in history_gists(self.model, self.gistnet, histories, torch.float32)]

    def _gist_losses(self, examples, lod):
        """(LOD1, LOD2) pooling losses, each the mean over rows of the row's mean (rows without a
        LOD2 gist count 0 for LOD2)."""
        zero = lod[0]["lod1"].sum() * 0.0
        aux1 = torch.stack([pooling_mse_loss(g["lod1"], g["inputs"]) if len(g["lod1"]) else zero for g in lod]).mean()
        aux2 = torch.stack([pooling_mse_loss(g["lod2"], g["lod1"].detach()[:len(g["lod2"]) * BLOCK_SIZE].reshape(
            len(g["lod2"]), BLOCK_SIZE, -1)) if len(g["lod2"]) else zero for g in lod]).mean()
        return aux1, aux2

    def _wcs(self, examples, lod, row_ids):
        """Every WC of the micro-batch, as dicts (kind, wc, history, lod1, lod2, horizon, horizon_mask,
        bos, tail, row). WC layouts depend only on the row (its id seeds the random mixes)."""
        cfg = self.config
        W = cfg["budget_tokens"]
        embed = lambda ids: token_embeddings(self.model, ids)
        items = []
        for (history, horizon, mask), g, row in zip(examples, lod, row_ids.tolist()):
            rng = np.random.default_rng([cfg["seed"], row])
            N = len(history)
            lod1, lod2 = g["lod1"], g["lod2"]
            tail = tail_gists_of(lod1.detach(), lod2.detach(), cfg["lod1_tail"])
            recency = WorkingContext.recency(N, W)
            layouts = [("recency", recency)] + [("random", WorkingContext.random_mix(rng, N, W))
                                                 for _ in range(cfg["random_wcs"])]
            if cfg["focused_wcs"]:
                store = TensorStore(history, lod1.detach(), lod2.detach())
                was_training = self.lensnet.training
                self.lensnet.eval()
                scores = self.lensnet.score_wc(recency, store, embed, tail_gists=tail)
                self.lensnet.train(was_training)
                self.allocator.reset()
                focused = self.allocator.refocus(recency, scores).wc
                layouts += [("focused", focused)] * cfg["focused_wcs"]
            for kind, wc in layouts:
                items.append(dict(kind=kind, wc=wc, history=history, lod1=lod1, lod2=lod2, horizon=horizon,
                                  horizon_mask=mask, bos=self.bos, tail=tail, row=row))
        return items

    def _horizon_nll(self, model, items):
        """Mean NLL over each WC's scored horizon tokens -> (R,), in one fixed-shape batch."""
        nll, _ = masked_horizon_nll(model, [it["wc"] for it in items], [item_store(it) for it in items],
                                    torch.stack([it["horizon"] for it in items]),
                                    torch.stack([it["horizon_mask"] for it in items]), self.bos, self.row_length)
        return nll.float()

    def _full_context_nll(self, model, rows, supervised):
        """Mean over rows of each row's mean next-token NLL on its supervised tokens, the whole row
        read as plain tokens (the testbed's pre-training loss; a mean per row, so ranks agree)."""
        mask = supervised[:, 1:]
        targets = torch.where(mask, rows[:, 1:], torch.full_like(rows[:, 1:], -1))
        per_token = model(rows[:, :-1], targets, loss_reduction="none").view(rows.size(0), -1)
        return (per_token * mask).sum(1).div(mask.sum(1).clamp(min=1)).mean()

    def _lens_loss(self, items, nll):
        """LensNet's losses on each row's recency WC, with this step's targets."""
        cfg = self.config
        by_row = {}
        for it, v in zip(items, nll.cpu().numpy()):
            by_row.setdefault(it["row"], []).append((it, float(v)))
        scored, targets = [], []
        if cfg["lens_target"] == "counterfactual":
            recency = [group[0][0] for group in by_row.values()]
            rng = np.random.default_rng([cfg["seed"], self.step])
            results = counterfactual_targets(self.model, recency, cfg["batch_rows"], cfg["max_candidates"], rng)
            scored, targets = recency, [r["targets"] for r in results]
        else:
            for group in by_row.values():
                (base_item, base_nll), best = group[0], min(group, key=lambda p: p[1])
                scored.append(base_item)
                targets.append(detail_targets(base_item["wc"], best[0]["wc"], base_nll - best[1], cfg["argmin_margin"]))
        scores = lens_scores(self.lensnet, scored, lambda ids: token_embeddings(self.model, ids))
        per_row = [lens_losses([s], [t], [it["wc"]], cfg["target_scale"], cfg["ranking_temperature"])
                   for s, t, it in zip(scores, targets, scored)]
        parts = {k: torch.stack([p[k] for p in per_row]).mean() for k in per_row[0]}
        flat = np.concatenate([t[np.isfinite(t)] for t in targets]) if targets else np.zeros(0)
        stats = {"lens_targets": int((flat != 0).sum()),
                 "lens_score_abs": float(np.mean([float(mask_illegal(s.detach(), it["wc"]).abs().mean())
                                                  for s, it in zip(scores, scored)]))}
        return parts, stats
