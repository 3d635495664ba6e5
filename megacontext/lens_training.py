"""
The `lensnet` variant: JT2, LensNet training on a frozen base model and a frozen, JT1-trained GistNet.

    python -m nanochat.train --config configs/lensnet_cpu.yaml

nanochat finds this class by name (entry point `nanochat.variants` in pyproject.toml) when a run
config says `variant: lensnet`. One micro-batch, step by step (each row is BOS + one document
with `long_documents`, as the data source `longdocs` makes them):
  1. per row a history and a horizon: history = the row from after the BOS up to t, horizon =
     the next `horizon` tokens, scored where the row is supervised (a synthetic row supervises
     only its question, answer and further queries). t = BOS + history_tokens, except in a
     synthetic row: there t is answer_tokens before the end of its first supervised span (kept
     within [min_history, history_tokens] and not before the span), so the history ends with the
     question and the horizon holds the answer, the tokens only focus can predict (LensNet sees
     the question in the tail, as it would at a refocus after the user asks).
  2. the history's LOD1 gists (every whole block) and LOD2 gists (every whole 1024-token span)
     from the frozen GistNet; tail gists = all LOD2 + the last lod1_tail LOD1 (as TailGistCache)
  3. wcs_per_row WCs at budget budget_tokens: the recency baseline and random mixes
  4. targets (megacontext/lens_targets.py): `counterfactual` utilities (every candidate of every
     WC through the base model in batches of batch_rows rows; at most max_candidates per WC),
     `attention` (the full-context attention mass, one forward of the rows), or `mixed`
     (attention for the first attention_steps steps, then counterfactual)
  5. LensNet scores all WCs in one padded batch; loss = w_regression * regression +
     w_ranking * ranking + w_budget * budget

Every eval_every steps: focus on held-out rows (the val split of eval_mixture): from the recency
WC, one refocus of the Focus Allocator (tau 0, at most 2 changes) on LensNet's scores, against the
best single candidate (a one-step oracle):
  val_focus_gain   mean NLL(recency) - NLL(LensNet's WC), nats per scored horizon token
  val_oracle_gain  mean max(0, best candidate utility)
  val_focus_share  focus_gain / oracle_gain
  val_top1         share of rows where LensNet's highest-scored gist is the oracle's best expansion
  val_pick_gain    mean utility of expanding LensNet's highest-scored gist (as the oracle would:
                   paired with a collapse of the oldest LOD0 block when the budget is full)
  val_loss_*       the JT2 losses on these rows' recency WCs (counterfactual targets)

The `lensnet:` section of the run config (DEFAULTS below lists every key):
  base_model_tag / base_step   the frozen base model (base_checkpoints/<tag>; required)
  gistnet                      a JT1 run's model tag (its last mc_XXXXXX.pt) or an mc path (required)
  lensnet                      LensNetConfig fields except n_embd (d_model, n_layer, n_head, mlp_ratio)
  seed, lr, weight_decay       LensNet init seed and AdamW (scaled by nanochat's LR schedule)
  target, attention_steps      counterfactual | attention | mixed (see step 4)
  budget_tokens, history_tokens, min_history, answer_tokens, horizon, long_documents, wcs_per_row,
  max_candidates, batch_rows, lod1_tail
  lookahead                    true: an expanded LOD2 gist is also scored with the child LensNet now
                               scores highest expanded (lens_targets.counterfactual_targets)
  row_tokens, mixture, data_seed  rows longer than the base model's sequence (e.g. 2081 for 2048-token
                               histories, whose WCs hold LOD2 gists): the variant reads its own long-document
                               rows (window_loader.LongDocSource with this mixture and seed) instead of the
                               run's data source; counterfactual targets only (their forwards read WCs)
  target_scale, attention_scale   score units per nat of utility / per unit of attention log-share
  ranking_temperature, w_regression, w_ranking, w_budget   the losses' knobs
  eval_every, eval_rows, eval_mixture, run_name
  ema_decay                    0 (default): the checkpoint holds the last step's weights. > 0: it holds an
                               exponential moving average of LensNet's weights over the steps (see _update_ema),
                               which the held-out eval, the harness and the runtime read; the raw weights are
                               saved beside it (lensnet_train) so a resume continues bit-identically

Metrics: loss() returns (loss, metrics) with the three losses and target statistics; the trainer
prints them at the end of its step line and logs them to its own wandb run (nanochat/hooks.py
variant_metrics_line / variant_wandb_metrics); on_step also writes them, with the trainer's loss,
lrm and dt, to the run's telemetry JSONL (megacontext/telemetry.py, which opens no wandb run here).

What it owns: LensNet's weights, their optimizer group and checkpoint (mc_XXXXXX.pt beside
upstream's files, with the GistNet identity), the sampling of JT2 examples and the JT2 telemetry.
It never changes the base model's or GistNet's weights; a vanilla run never touches this file.
"""

import contextlib
import time
from dataclasses import asdict

import numpy as np
import torch

from nanochat.common import print0
from megacontext import base_inputs
from megacontext.gistnet import history_gists, token_embeddings
from megacontext.lensnet import LensNet, LensNetConfig, tail_gists_of, mask_illegal
from megacontext.lens_targets import (counterfactual_targets, attention_mass, attention_targets, lens_losses,
                                      horizon_nlls, item_store, lens_scores)
from megacontext.tree import BLOCK_SIZE
from megacontext.variant import last_mc_file, load_base_weights, merged_config, variant_telemetry
from megacontext.window_loader import history_horizon
from megacontext.working_context import WorkingContext

TARGETS = ("counterfactual", "attention", "mixed")
DEFAULTS = dict(
    base_model_tag=None, base_step=None, gistnet=None, lensnet={}, seed=0, lr=3e-3, weight_decay=0.0,
    target="counterfactual", attention_steps=50,
    budget_tokens=128, history_tokens=1024, min_history=160, answer_tokens=6, horizon=32, long_documents=True,
    wcs_per_row=2, max_candidates=None, batch_rows=32, lod1_tail=256, lookahead=False,
    row_tokens=None, mixture=None, data_seed=2,
    target_scale=10.0, attention_scale=1.0, ranking_temperature=1.0, w_regression=1.0, w_ranking=1.0, w_budget=0.1,
    eval_every=0, eval_rows=8, eval_mixture={"natural": 0.5, "passkey": 0.25, "assoc": 0.25},
    ema_decay=0.0, run_name=None,
)


class LensNetVariant:
    name = "lensnet"

    def __init__(self, config):
        cfg = self.config = merged_config(config, DEFAULTS, "lensnet")
        if cfg["target"] not in TARGETS:
            raise ValueError(f"lensnet.target must be one of {', '.join(TARGETS)}, got {cfg['target']!r}")
        if cfg["budget_tokens"] < 2 * BLOCK_SIZE:
            raise ValueError(f"lensnet.budget_tokens must be at least {2 * BLOCK_SIZE} (the LOD0 tail plus room), "
                             f"got {cfg['budget_tokens']}")
        if not (BLOCK_SIZE <= cfg["min_history"] <= cfg["history_tokens"]):
            raise ValueError(f"lensnet needs {BLOCK_SIZE} <= min_history <= history_tokens, got "
                             f"min_history={cfg['min_history']}, history_tokens={cfg['history_tokens']}")
        if cfg["wcs_per_row"] < 1 or cfg["horizon"] < 1:
            raise ValueError("lensnet.wcs_per_row and lensnet.horizon must be >= 1")
        if not (0.0 <= cfg["ema_decay"] < 1.0):
            raise ValueError(f"lensnet.ema_decay must be in [0, 1) (0 = no weight average), got {cfg['ema_decay']}")
        if cfg["row_tokens"] is not None:
            if cfg["target"] != "counterfactual":
                raise ValueError("lensnet.row_tokens (rows longer than the base model's sequence) needs target: "
                                 "counterfactual; the attention target reads whole histories at full context")
            self.train_loader = self._own_rows  # the trainer's hook: these rows replace its stream
        self.step = 0
        self.micro = 0
        self.model = self.gistnet = self.lensnet = self.telemetry = None
        self.ema, self.ema_updates = None, 0  # with ema_decay > 0: the averaged state_dict and its update count
        self.last_metrics = {}
        self.val_rows = None

    # -------------------------------------------------------------------------
    # hooks called by nanochat/train.py

    def build(self, model, run_args, resuming=False):
        """Load and freeze the base model (unless resuming: the checkpoint's weights are loaded
        already) and the GistNet, create LensNet; return its group."""
        from megacontext.ingest import load_gister
        cfg = self.config
        rows = cfg["row_tokens"] or model.config.sequence_len + 1
        room = rows - (1 if cfg["long_documents"] else 0)
        if cfg["history_tokens"] + cfg["horizon"] > room:
            raise ValueError(f"lensnet history_tokens + horizon = {cfg['history_tokens'] + cfg['horizon']} exceeds "
                             f"the {room} tokens a row holds ({'row_tokens ' + str(rows) if cfg['row_tokens'] else 'max_seq_len ' + str(model.config.sequence_len)}); "
                             f"lower lensnet.history_tokens or lensnet.horizon, or set lensnet.row_tokens")
        if 1 + cfg["budget_tokens"] + cfg["horizon"] - 1 > model.config.sequence_len:
            raise ValueError(f"lensnet budget_tokens + horizon = {cfg['budget_tokens'] + cfg['horizon']} exceeds the "
                             f"base model's max_seq_len {model.config.sequence_len}: its WC rows would not fit")
        if not cfg["gistnet"]:
            raise ValueError("lensnet.gistnet is required: the JT1 GistNet whose gists LensNet scores (a model tag "
                             "such as longctx_cpu_gistnet, or a path to its mc_XXXXXX.pt)")
        if not resuming:
            self._load_base_weights(model, run_args)
        model.requires_grad_(False)
        base_inputs.attach(model)
        self.model = model
        device = model.get_device()
        self.gistnet = load_gister(last_mc_file(cfg["gistnet"], f"GistNet for lensnet.gistnet '{cfg['gistnet']}'",
                                                 "python -m nanochat.train --config configs/gistnet_longctx_cpu.yaml"),
                                   model.config.n_embd, device)
        self.gistnet.requires_grad_(False)
        self.gistnet_identity = self.gistnet.identity()
        lens_config = LensNetConfig(n_embd=model.config.n_embd, **cfg["lensnet"])
        self.lensnet = LensNet(lens_config, gistnet_identity=self.gistnet_identity).init_weights(seed=cfg["seed"])
        self.lensnet.to(device).train()
        if cfg["ema_decay"] > 0:
            self._start_ema()
        print0(f"LensNet: d_model {lens_config.d_model}, {lens_config.n_layer} layers "
               f"({self.lensnet.num_params():,} params); GistNet {self.gistnet_identity} (frozen)")
        self.telemetry = variant_telemetry(cfg, run_args, "lensnet")
        return [dict(kind="adamw", params=list(self.lensnet.parameters()), lr=cfg["lr"],
                     betas=(0.9, 0.95), eps=1e-10, weight_decay=cfg["weight_decay"])]

    def loss(self, model, batch, step):
        """JT2 loss of one micro-batch (model is ignored: the uncompiled base reads variable shapes)."""
        cfg = self.config
        x, y = batch
        rng = np.random.default_rng([cfg["seed"], step, self.micro])
        self.micro += 1
        t0 = time.time()
        items = self._items(x, y, rng, n_wcs=cfg["wcs_per_row"])
        target = cfg["target"]
        if target == "mixed":
            target = "attention" if step < cfg["attention_steps"] else "counterfactual"
        if target == "attention":
            targets = self._attention_targets(items)
            base_nll = []
        else:
            results = counterfactual_targets(self.model, items, cfg["batch_rows"], cfg["max_candidates"], rng,
                                             lookahead=self._pick_child if cfg["lookahead"] else None)
            targets = [r["targets"] for r in results]
            base_nll = [r["nll"] for r in results]
        t_targets = time.time() - t0
        if not items:  # no row had a scored horizon token: a zero loss that still reaches every parameter
            self.last_metrics = {"n_wcs": 0}
            return sum(p.sum() for p in self.lensnet.parameters()) * 0.0, self.last_metrics
        scores = self._scores(items)
        scale = cfg["attention_scale"] if target == "attention" else cfg["target_scale"]
        parts = lens_losses(scores, targets, [it["wc"] for it in items], scale, cfg["ranking_temperature"])
        loss = (cfg["w_regression"] * parts["regression"] + cfg["w_ranking"] * parts["ranking"]
                + cfg["w_budget"] * parts["budget"])
        finite = np.concatenate([t[np.isfinite(t)] for t in targets]) if targets else np.zeros(0)
        metrics = {f"loss_{k}": float(v.detach()) for k, v in parts.items()}
        metrics.update(target=target, targets_s=t_targets, n_wcs=len(items), n_targets=int(finite.size),
                       target_mean=float(finite.mean()) if finite.size else float("nan"),
                       target_pos_share=float((finite > 0).mean()) if finite.size else float("nan"))
        if base_nll:
            metrics["wc_nll"] = float(np.nanmean(base_nll))
            metrics["lookaheads"] = int(sum(r["lookaheads"] for r in results))
        self.last_metrics = metrics
        return loss, metrics

    def on_step(self, step, metrics):
        cfg = self.config
        record = {**self.last_metrics, **metrics}
        if self.ema is not None:  # on_step runs after the optimizer step
            self._update_ema()
        if cfg["eval_every"] > 0 and (step + 1) % cfg["eval_every"] == 0:
            with self._averaged():
                record.update({f"val_{k}": v for k, v in self.evaluate().items()})
            print0(f"step {step:05d} | JT2 val focus gain {record['val_focus_gain']:.4f} of oracle "
                   f"{record['val_oracle_gain']:.4f} (share {record['val_focus_share']:.3f}); top gist's gain "
                   f"{record['val_pick_gain']:.4f}, top1 {record['val_top1']:.2f}; ranking {record['val_loss_ranking']:.4f}")
        self.telemetry.log(record, step=step)
        self.step = step + 1
        self.micro = 0

    def state_dict(self):
        # "lensnet" is what every reader loads (lensnet.load_lensnet): the average when there is one
        state = {
            "lensnet": {"config": asdict(self.lensnet.config),
                        "state_dict": self.ema if self.ema is not None else self.lensnet.state_dict()},
            "gistnet_identity": self.gistnet_identity,
            "step": self.step,
            "lensnet_config": self.config,
        }
        if self.ema is not None:
            state["lensnet_train"] = self.lensnet.state_dict()
            state["ema_updates"] = self.ema_updates
        return state

    def load_state_dict(self, state):
        if state.get("gistnet_identity") != self.gistnet_identity:
            raise ValueError(f"the LensNet state was trained with GistNet {state.get('gistnet_identity')} but this "
                             f"run loads {self.gistnet_identity}; resume with the same lensnet.gistnet")
        self.lensnet.load_state_dict(state.get("lensnet_train", state["lensnet"]["state_dict"]))
        if self.ema is not None:
            if "lensnet_train" in state:  # the average goes on from where it was saved
                self.ema = {k: v.detach().clone() for k, v in state["lensnet"]["state_dict"].items()}
                self.ema_updates = state["ema_updates"]
            else:  # resuming a run saved without an average: it starts at the resumed weights
                self._start_ema()
        self.step = state["step"]

    # -------------------------------------------------------------------------
    # the weight average (ema_decay > 0)

    def _start_ema(self):
        self.ema = {k: v.detach().clone() for k, v in self.lensnet.state_dict().items()}
        self.ema_updates = 0

    @torch.no_grad()
    def _update_ema(self):
        """After an optimizer step: ema <- d * ema + (1 - d) * weights, d = min(ema_decay, (1 + n) / (10 + n))
        at the n-th update. The ramp keeps a short run (or the first steps) from averaging in the random
        init: d is 0.1 at the first update and reaches 0.98 after 440."""
        decay = min(self.config["ema_decay"], (1 + self.ema_updates) / (10 + self.ema_updates))
        for k, v in self.lensnet.state_dict().items():
            if v.is_floating_point():
                self.ema[k].lerp_(v, 1.0 - decay)
            else:
                self.ema[k].copy_(v)
        self.ema_updates += 1

    @contextlib.contextmanager
    def _averaged(self):
        """Within it self.lensnet holds the averaged weights (the held-out eval reads the model that is saved)."""
        if self.ema is None:
            yield
            return
        trained = {k: v.detach().clone() for k, v in self.lensnet.state_dict().items()}
        self.lensnet.load_state_dict(self.ema)
        try:
            yield
        finally:
            self.lensnet.load_state_dict(trained)

    # -------------------------------------------------------------------------
    # examples

    def _windows(self, x, y):
        """Per row (history (L_r,), horizon (H,), horizon_mask (H,)) from a trainer micro-batch (step 1)."""
        cfg = self.config
        rows = torch.cat([x, y[:, -1:]], dim=1)
        supervised = torch.cat([torch.zeros_like(y[:, :1], dtype=torch.bool), y >= 0], dim=1)
        skip = 1 if cfg["long_documents"] else 0
        return [history_horizon(rows[r], supervised[r], cfg["history_tokens"], cfg["horizon"], cfg["min_history"],
                                cfg["answer_tokens"], skip) for r in range(rows.size(0))]

    @torch.no_grad()
    def _gists(self, histories):
        """Per history (lod1 (n_blocks, D), lod2 (n_groups, D)) from the frozen GistNet, in fp32."""
        return [(lod1, lod2) for lod1, lod2, _ in history_gists(self.model, self.gistnet, histories, torch.float32)]

    def _items(self, x, y, rng, n_wcs, recency_only=False):
        """The examples of a micro-batch: one dict per WC (see lens_targets.counterfactual_targets)."""
        cfg = self.config
        W = cfg["budget_tokens"]
        windows = [w for w in self._windows(x, y) if bool(w[2].any())]  # rows with nothing scored teach nothing
        gists = self._gists([w[0] for w in windows]) if windows else []
        bos = int(x[0, 0]) if cfg["long_documents"] else None
        items = []
        for (history, horizon, mask), (lod1, lod2) in zip(windows, gists):
            N = len(history)
            wcs = [WorkingContext.recency(N, W)]
            if not recency_only:
                wcs += [WorkingContext.random_mix(rng, N, W) for _ in range(n_wcs - 1)]
            tail = tail_gists_of(lod1, lod2, cfg["lod1_tail"])
            for wc in wcs:
                items.append(dict(wc=wc, history=history, lod1=lod1, lod2=lod2, horizon=horizon, horizon_mask=mask,
                                  bos=bos, tail=tail))
        return items

    def _own_rows(self, tokenizer, B, T, device, resume_state_dict=None):
        """With row_tokens: (x, y, state) rows of row_tokens long documents (BOS first; the run's
        max_seq_len T stays the base model's, which reads only WCs of 1 + W + H - 1 positions)."""
        from megacontext.window_loader import LongDocSource
        cfg = self.config
        source = LongDocSource({"source": "longdocs", "seed": cfg["data_seed"], "mixture": cfg["mixture"]})
        return source.train_loader(tokenizer, B, cfg["row_tokens"] - 1, device, resume_state_dict)

    @torch.no_grad()
    def _pick_child(self, wc, item, children):
        """The lookahead's choice (lens_targets.counterfactual_targets): the child of an expanded LOD2
        gist that the current LensNet scores highest, as the next refocus round would expand it."""
        scores = lens_scores(self.lensnet, [dict(item, wc=wc)], lambda ids: token_embeddings(self.model, ids))[0]
        return children[int(torch.argmax(scores[children]))]

    def _scores(self, items):
        """LensNet's raw scores of every item's WC, in one padded batch (with gradients)."""
        return lens_scores(self.lensnet, items, lambda ids: token_embeddings(self.model, ids))

    def _attention_targets(self, items):
        by_history = {}
        for it in items:  # the WCs of one row share its history: one attention pass per row
            by_history.setdefault(id(it["history"]), it)
        firsts = list(by_history.values())
        bos = firsts[0]["bos"] if firsts else None
        masses = attention_mass(self.model, [it["history"] for it in firsts],
                                torch.stack([it["horizon"] for it in firsts]),
                                torch.stack([it["horizon_mask"] for it in firsts]), bos=bos)
        mass_of = {id(it["history"]): m for it, m in zip(firsts, masses)}
        return [attention_targets(it["wc"], mass_of[id(it["history"])]) for it in items]

    # -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self):
        """Focus on held-out rows (see the module docstring)."""
        from megacontext.allocator import FocusAllocator, AllocatorConfig
        cfg = self.config
        if self.val_rows is None:
            self.val_rows = self._val_rows()
        self.lensnet.eval()
        rng = np.random.default_rng(0)
        items = []
        for x, y in self.val_rows:
            items += self._items(x, y, rng, n_wcs=1, recency_only=True)
        results = counterfactual_targets(self.model, items, cfg["batch_rows"])
        raw = self._scores(items)
        held_out = lens_losses(raw, [r["targets"] for r in results], [it["wc"] for it in items],
                               cfg["target_scale"], cfg["ranking_temperature"])
        scores = [mask_illegal(s, it["wc"]).cpu().numpy() for s, it in zip(raw, items)]
        allocator = FocusAllocator(AllocatorConfig(tau_expand=0.0, tau_collapse=0.0, max_changes=2, cooldown=0,
                                                   hysteresis=0.0))
        focused = []
        for it, s in zip(items, scores):
            allocator.reset()
            focused.append(allocator.refocus(it["wc"], s).wc)
        nll = horizon_nlls(self.model, focused, [item_store(it) for it in items],
                           torch.stack([it["horizon"] for it in items]), torch.stack([it["horizon_mask"] for it in items]),
                           items[0]["bos"] if items else None, cfg["batch_rows"]).numpy()
        gains, oracle, top1, pick = [], [], [], []
        for r, s, n, it in zip(results, raw, nll, items):
            gains.append(r["nll"] - float(n))
            expand = [(u, a[1][0]) for a, u in zip(r["actions"], r["utilities"]) if a[0] == "expand"]
            best = max(expand) if expand else (0.0, None)
            oracle.append(max(0.0, best[0]))
            gist_scores = np.where(it["wc"].levels > 0, s.cpu().numpy(), -np.inf)  # raw: the ranking of the gists
            choice = int(np.argmax(gist_scores))
            top1.append(float(best[1] is not None and choice == best[1]))
            pick.append(dict((i, u) for u, i in expand).get(choice, 0.0))
        self.lensnet.train()
        g, o = float(np.mean(gains)), float(np.mean(oracle))
        return {"focus_gain": g, "oracle_gain": o, "focus_share": g / o if o > 0 else float("nan"),
                "top1": float(np.mean(top1)), "pick_gain": float(np.mean(pick)), "rows": len(items),
                **{f"loss_{k}": float(v) for k, v in held_out.items()}}

    def _val_rows(self):
        from nanochat.tokenizer import get_tokenizer
        cfg = self.config
        tokenizer = get_tokenizer()
        device = self.model.get_device()
        T = (cfg["row_tokens"] - 1) if cfg["row_tokens"] else self.model.config.sequence_len  # rows like training's
        if cfg["long_documents"]:
            from megacontext.window_loader import LongDocSource
            loader = LongDocSource({"source": "longdocs", "mixture": cfg["eval_mixture"]}).val_loader(
                tokenizer, 2, T, device)
        else:
            from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
            loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, 2, T, split="val", device=device)
        return [tuple(t.clone() for t in next(loader)[:2]) for _ in range(max(1, cfg["eval_rows"] // 2))]

    def _load_base_weights(self, model, run_args):
        load_base_weights(model, self.config["base_model_tag"], self.config["base_step"], run_args, section="lensnet",
                          example="base_model_tag: longctx_cpu after `python -m nanochat.train --config configs/longctx_cpu.yaml`")
