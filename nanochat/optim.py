"""
MuonAdamW: the one optimizer nanochat trains with.

Each param group says which half of the optimizer owns it through group['kind']:
- 'adamw': embeddings, the lm_head and the handful of scalar gains. Plain decoupled
  AdamW, run as one compiled kernel per parameter.
- 'muon': the 2D weight matrices of the transformer blocks, grouped by shape so a
  whole group is stacked into one (K, rows, cols) tensor and updated by one compiled
  kernel: Nesterov momentum -> row equilibration -> Polar Express orthogonalisation
  -> Frobenius renormalisation -> NorMuon variance reduction -> cautious weight decay.

Single process and multi-GPU use the same class. When torch.distributed is
initialised with more than one rank, gradient averaging happens here (nanochat has no
DDP wrapper) and the work and the optimizer state are sharded ZeRO-2 style: each
rank reduce-scatters the gradients, updates only its own shard, then all-gathers the
updated weights. With one rank every collective is skipped.

The algorithms come from modded-nanogpt (Keller Jordan et al.) as adapted in
nanochat; the papers are cited next to each trick below.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.common import COMPUTE_DTYPE

# -----------------------------------------------------------------------------
# AdamW (https://arxiv.org/abs/1711.05101)
#
# The hyperparameters arrive as 0-d float32 CPU tensors rather than Python floats:
# torch.compile would bake a float into the graph and recompile every time the LR
# schedule moves it, whereas a tensor's value is read at run time.

@torch.compile(dynamic=False, fullgraph=True)
def adamw_step_fused(
    p: Tensor,            # parameter (or this rank's row slice of it)
    grad: Tensor,         # gradient, same shape as p
    exp_avg: Tensor,      # first moment, same shape as p
    exp_avg_sq: Tensor,   # second moment, same shape as p
    step_t: Tensor,       # 0-d: 1-based step count of this parameter
    lr_t: Tensor,         # 0-d: learning rate
    beta1_t: Tensor,      # 0-d
    beta2_t: Tensor,      # 0-d
    eps_t: Tensor,        # 0-d
    wd_t: Tensor,         # 0-d: decoupled weight decay
) -> None:
    """One AdamW update of p in place: decay, moments, bias correction, step."""
    # wte/value_embeds may be stored in bf16 on GPU. Doing the arithmetic in fp32 keeps
    # terms like (1 - beta2) exact and avoids mixed-dtype ops that MPS rejects; the
    # casts are free when everything is already fp32 and fuse away under compile.
    p32 = p.float()
    exp_avg32 = exp_avg.float()
    exp_avg_sq32 = exp_avg_sq.float()
    grad32 = grad.float()
    # decoupled weight decay, applied to the weights before the gradient step
    p32.mul_(1 - lr_t * wd_t)
    # moment estimates as lerps (m += (1-beta1)(g - m)), which fuse into one pass
    exp_avg32.lerp_(grad32, 1 - beta1_t)
    exp_avg_sq32.lerp_(grad32.square(), 1 - beta2_t)
    # undo the bias of the zero-initialised moments
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (exp_avg_sq32 / bias2).sqrt() + eps_t
    step_size = lr_t / bias1
    p32.add_(exp_avg32 / denom, alpha=-step_size)
    # store results in the original tensors (a no-op copy for fp32 storage)
    p.copy_(p32)
    exp_avg.copy_(exp_avg32)
    exp_avg_sq.copy_(exp_avg_sq32)

# -----------------------------------------------------------------------------
# Muon (https://kellerjordan.github.io/posts/muon/)
#
# Muon keeps SGD-Nesterov momentum, but before applying it replaces the momentum
# matrix M = U S V^T by (approximately) its orthogonal polar factor U V^T, so every
# singular direction of the update moves by the same amount. nanochat approximates the
# polar factor with Polar Express (Amsel, Persson, Musco, Gower;
# https://arxiv.org/abs/2505.16932): a few odd quintic iterations
#     X <- a X + b (X X^T) X + c (X X^T)^2 X
# whose per-iteration (a, b, c) were optimised offline for num_iters=5,
# safety_factor=2e-2, cushion=2. The output is only roughly orthogonal (singular
# values land in a band around 1), which in practice trains just as well.
#
# Around the orthogonalisation sit three small refinements:
# - MuonEq row equilibration (https://arxiv.org/abs/2603.28254): rows are rescaled to
#   a common norm first, which conditions the spectrum the iteration sees.
# - Muon+ renormalisation (https://arxiv.org/abs/2602.21545): the result is snapped to
#   Frobenius norm sqrt(min(rows, cols)), the norm of an exactly semi-orthogonal
#   matrix, which corrects for the iteration not fully converging.
# - NorMuon (https://arxiv.org/abs/2510.05491): orthogonalised updates still have
#   uneven per-neuron scales, so an Adam-like second moment kept per row (or per
#   column) rescales them, then the whole matrix is rescaled back to its pre-NorMuon
#   norm so only the distribution of the step changes, not its size.
# Finally, weight decay is "cautious": it only shrinks entries where the update and
# the weight have the same sign.

# (a, b, c) for each of the 5 Polar Express iterations
polar_express_coeffs = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


@torch.compile(dynamic=False, fullgraph=True)
def muon_step_fused(
    stacked_grads: Tensor,           # (K, rows, cols) gradients; overwritten (used as scratch)
    stacked_params: Tensor,          # (K, rows, cols) parameters, updated in place
    momentum_buffer: Tensor,         # (K, rows, cols) Nesterov momentum
    second_momentum_buffer: Tensor,  # (K, rows, 1) if rows >= cols else (K, 1, cols)
    momentum_t: Tensor,              # 0-d: momentum coefficient
    lr_t: Tensor,                    # 0-d: learning rate (already shape-scaled)
    wd_t: Tensor,                    # 0-d: cautious weight decay
    beta2_t: Tensor,                 # 0-d: decay of the NorMuon second moment
    ns_steps: int,                   # how many Polar Express iterations to run
    red_dim: int,                    # -1 (per-row statistics) or -2 (per-column)
) -> None:
    """One Muon update of a stack of equally shaped matrices, in place."""
    # --- Nesterov momentum: buf <- lerp(buf, g, 1-mu); update <- lerp(g, buf, mu)
    momentum = momentum_t.to(stacked_grads.dtype)
    momentum_buffer.lerp_(stacked_grads, 1 - momentum)
    g = stacked_grads.lerp_(momentum_buffer, momentum)

    # The matmuls run in bf16 when that is the compute dtype (fast on tensor cores);
    # fp16 is never used here, its exponent range is too narrow for the iteration.
    X = g.bfloat16() if COMPUTE_DTYPE == torch.bfloat16 else g

    # --- MuonEq: give every row the mean row norm (norms taken in fp32)
    target = X.float().norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (target / row_norm).to(X.dtype)

    # --- Polar Express. Scale so the spectral norm is below 1 (Frobenius bounds it;
    # the 1.01 leaves margin for bf16 rounding), then iterate on the smaller Gram
    # matrix: X^T X for tall matrices, X X^T for wide ones.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    if g.size(-2) > g.size(-1):
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in polar_express_coeffs[:ns_steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    # back to the parameter dtype before the elementwise tail (MPS rejects mixed dtypes)
    g = X.to(stacked_params.dtype)

    # --- Muon+: Frobenius norm of a semi-orthogonal (rows x cols) matrix
    target_norm = min(g.size(-2), g.size(-1)) ** 0.5
    current_norm = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    g = g * (target_norm / current_norm).to(g.dtype)

    # --- NorMuon: per-row/column second moment, then restore the matrix's norm
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm_sq = v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size
    v_norm = v_norm_sq.sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    final_scale = step_size * (v_norm / v_norm_new.clamp_min(1e-10))
    g = g * final_scale.to(g.dtype)

    # --- step, with weight decay only where update and weight agree in sign
    lr = lr_t.to(g.dtype)
    wd = wd_t.to(g.dtype)
    mask = (g * stacked_params) >= 0
    stacked_params.sub_(lr * g + lr * wd * stacked_params * mask)

# -----------------------------------------------------------------------------

class MuonAdamW(torch.optim.Optimizer):
    """
    Muon for the transformer's matrices, AdamW for everything else, in one optimizer.

    param_groups: list of dicts, each with 'params' and 'kind':
      kind='adamw' needs 'lr', 'betas', 'eps', 'weight_decay'
      kind='muon'  needs 'lr', 'momentum', 'ns_steps', 'beta2', 'weight_decay';
                   all its params must be 2D matrices of one shape (they are stacked)
    Muon is meant for hidden weight matrices only: keep embeddings, the output head
    and 0/1-D parameters in AdamW groups.

    Distributed (torch.distributed initialised, world_size > 1), per step():
      1. start every gradient reduction (asynchronous on NCCL):
         - AdamW params with < 1024 elements: all_reduce the whole grad; every rank
           updates the whole param (state replicated, but these are tiny).
         - larger AdamW params: reduce_scatter along dim 0 (shape[0] must divide by
           world_size); each rank updates and keeps state for its rows only.
         - Muon group of K matrices: stack them, zero-pad to ceil(K/N)*N, and
           reduce_scatter so rank r owns matrices [r*ceil(K/N), (r+1)*ceil(K/N)).
      2. group by group, wait for its reduction, run the fused update on the owned
         part, and start the all_gather of the result, so later groups' compute
         overlaps earlier groups' gathers.
      3. wait for all gathers and copy the Muon stacks back into the parameters.
    With one rank all communication is skipped and the rank owns everything, so the
    same code reduces to a plain full-tensor update. Optimizer state is therefore
    per-rank in distributed runs: each rank saves and loads its own state_dict().
    """

    def __init__(self, param_groups: list[dict]):
        super().__init__(param_groups, defaults={})
        # Hyperparameters are passed to the compiled kernels through these reusable 0-d
        # CPU tensors, refilled before each call, so schedules never cause recompiles.
        self._adamw_step_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._adamw_lr_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._adamw_beta1_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._adamw_beta2_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._adamw_eps_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._adamw_wd_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._muon_momentum_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._muon_lr_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._muon_wd_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")
        self._muon_beta2_t = torch.tensor(0.0, dtype=torch.float32, device="cpu")

    def _reduce_adamw(self, group: dict, world_size: int) -> dict:
        """Phase 1, AdamW: per param, the gradient (slice) this rank will use and a future to await."""
        param_infos = {}
        for p in group['params']:
            grad = p.grad
            if world_size == 1:
                param_infos[p] = dict(future=None, grad_slice=grad, is_small=True)
            elif p.numel() < 1024:
                # tiny params: every rank averages the whole grad and updates the whole param
                future = _all_reduce_avg(grad, world_size)  # ours: gloo fallback inside (see the end of the file)
                param_infos[p] = dict(future=future, grad_slice=grad, is_small=True)
            else:
                if grad.shape[0] % world_size != 0:  # ours: a clear error instead of an assert
                    raise RuntimeError(f"AdamW shards parameters by rows: shape[0]={grad.shape[0]} of a {tuple(grad.shape)} parameter is not divisible by world_size={world_size}; pad the parameter or use a world size that divides it")
                rank_size = grad.shape[0] // world_size
                grad_slice = torch.empty_like(grad[:rank_size])
                future = _reduce_scatter_avg(grad_slice, grad, world_size)
                param_infos[p] = dict(future=future, grad_slice=grad_slice, is_small=False)
        return dict(param_infos=param_infos)

    def _reduce_muon(self, group: dict, world_size: int) -> dict:
        """Phase 1, Muon: stack the group's grads; in distributed mode start the reduce-scatter."""
        params = group['params']
        if world_size == 1:
            # this rank owns every matrix; the stack itself is the owned chunk
            grad_chunk = torch.stack([p.grad for p in params])
            return dict(future=None, grad_chunk=grad_chunk, stacked_grads=None, chunk_size=len(params))
        chunk_size = (len(params) + world_size - 1) // world_size
        padded_num_params = chunk_size * world_size
        p = params[0]
        shape, device, dtype = p.shape, p.device, p.dtype

        # zero-padded (padded_num_params, rows, cols) stack of grads
        grad_stack = torch.stack([p.grad for p in params])
        stacked_grads = torch.empty(padded_num_params, *shape, dtype=dtype, device=device)
        stacked_grads[:len(params)].copy_(grad_stack)
        if len(params) < padded_num_params:
            stacked_grads[len(params):].zero_()

        # rank r receives matrices [r*chunk_size, (r+1)*chunk_size), averaged over ranks
        grad_chunk = torch.empty(chunk_size, *shape, dtype=dtype, device=device)
        future = _reduce_scatter_avg(grad_chunk, stacked_grads, world_size)

        return dict(future=future, grad_chunk=grad_chunk, stacked_grads=stacked_grads, chunk_size=chunk_size)

    def _compute_adamw(self, group: dict, info: dict, gather_list: list, rank: int, world_size: int) -> None:
        """Phase 2, AdamW: wait for each reduction, update, start the gather of sharded params."""
        param_infos = info['param_infos']
        for p in group['params']:
            pinfo = param_infos[p]
            if pinfo['future'] is not None:
                pinfo['future'].wait()
            grad_slice = pinfo['grad_slice']
            state = self.state[p]

            # sharded params update this rank's rows, a view, so the kernel writes into p
            if pinfo['is_small']:
                p_slice = p
            else:
                rank_size = p.shape[0] // world_size
                p_slice = p[rank * rank_size:(rank + 1) * rank_size]

            if not state:
                state['step'] = 0
                state['exp_avg'] = torch.zeros_like(p_slice)
                state['exp_avg_sq'] = torch.zeros_like(p_slice)
            state['step'] += 1

            self._adamw_step_t.fill_(state['step'])
            self._adamw_lr_t.fill_(group['lr'])
            self._adamw_beta1_t.fill_(group['betas'][0])
            self._adamw_beta2_t.fill_(group['betas'][1])
            self._adamw_eps_t.fill_(group['eps'])
            self._adamw_wd_t.fill_(group['weight_decay'])
            adamw_step_fused(
                p_slice, grad_slice, state['exp_avg'], state['exp_avg_sq'],
                self._adamw_step_t, self._adamw_lr_t, self._adamw_beta1_t,
                self._adamw_beta2_t, self._adamw_eps_t, self._adamw_wd_t,
            )

            # every rank's rows land back in the full p
            if not pinfo['is_small']:
                future = _all_gather(p, p_slice)
                gather_list.append(dict(future=future, params=None))

    def _compute_muon(self, group: dict, info: dict, gather_list: list, rank: int) -> None:
        """Phase 2, Muon: wait for the reduction, update the owned matrices, start the gather."""
        if info['future'] is not None:
            info['future'].wait()
        params = group['params']
        chunk_size = info['chunk_size']
        grad_chunk = info['grad_chunk']
        p = params[0]
        shape, device, dtype = p.shape, p.device, p.dtype

        # the last ranks may own padding only
        start_idx = rank * chunk_size
        num_owned = min(chunk_size, max(0, len(params) - start_idx))

        # Group-level state lives on the group's first parameter and covers this rank's
        # chunk. The factored second moment keeps one value per row for tall/square
        # matrices and one per column for wide ones.
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(chunk_size, *shape, dtype=dtype, device=device)
        if "second_momentum_buffer" not in state:
            state_shape = (chunk_size, shape[-2], 1) if shape[-2] >= shape[-1] else (chunk_size, 1, shape[-1])
            state["second_momentum_buffer"] = torch.zeros(state_shape, dtype=dtype, device=device)
        red_dim = -1 if shape[-2] >= shape[-1] else -2

        stacked_owned = None
        if num_owned > 0:
            owned_params = [params[start_idx + i] for i in range(num_owned)]
            stacked_owned = torch.stack(owned_params)

            self._muon_momentum_t.fill_(group["momentum"])
            self._muon_beta2_t.fill_(group["beta2"])
            # tall matrices get a larger step, sqrt(rows/cols), so their per-element
            # update size matches the square/wide case
            self._muon_lr_t.fill_(group["lr"] * max(1.0, shape[-2] / shape[-1])**0.5)
            self._muon_wd_t.fill_(group["weight_decay"])
            muon_step_fused(
                grad_chunk[:num_owned], stacked_owned,
                state["momentum_buffer"][:num_owned], state["second_momentum_buffer"][:num_owned],
                self._muon_momentum_t, self._muon_lr_t, self._muon_wd_t, self._muon_beta2_t,
                group["ns_steps"], red_dim,
            )

        if info['stacked_grads'] is None:
            # single rank: the updated stack is already the full result
            gather_list.append(dict(future=None, stacked_params=stacked_owned, params=params))
            return

        # zero-padded chunk in, full stack out
        updated_params = torch.empty(chunk_size, *shape, dtype=dtype, device=device)
        if num_owned > 0:
            updated_params[:num_owned].copy_(stacked_owned)
        if num_owned < chunk_size:
            updated_params[num_owned:].zero_()

        # the grad stack is no longer needed: reuse it as the gather destination to save memory
        stacked_params = info["stacked_grads"]
        future = _all_gather(stacked_params, updated_params)
        gather_list.append(dict(future=future, stacked_params=stacked_params, params=params))

    def _finish_gathers(self, gather_list: list) -> None:
        """Phase 3: wait for every gather; unstack Muon results into the parameters (padding dropped)."""
        for info in gather_list:
            if info["future"] is not None:
                info["future"].wait()
            if info["params"] is not None:
                torch._foreach_copy_(info["params"], list(info["stacked_params"][:len(info["params"])].unbind(0)))

    @torch.no_grad()
    def step(self):
        # with one rank (no process group) every collective is skipped
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            world_size = dist.get_world_size()
        else:
            rank = 0
            world_size = 1
        self._check_grads()  # ours: a clear error for a missing .grad instead of a crash mid-step

        # phase 1: start all reductions before any compute, so they overlap
        reduce_infos: list[dict] = []
        for group in self.param_groups:
            if group['kind'] == 'adamw':
                reduce_infos.append(self._reduce_adamw(group, world_size))
            elif group['kind'] == 'muon':
                reduce_infos.append(self._reduce_muon(group, world_size))
            else:
                raise ValueError(f"Unknown optimizer kind {group['kind']!r}; use 'adamw' or 'muon'")

        # phase 2: update each group as soon as its reduction is in, launch its gather
        gather_list: list[dict] = []
        for group, info in zip(self.param_groups, reduce_infos):
            if group['kind'] == 'adamw':
                self._compute_adamw(group, info, gather_list, rank, world_size)
            elif group['kind'] == 'muon':
                self._compute_muon(group, info, gather_list, rank)
            else:
                raise ValueError(f"Unknown optimizer kind {group['kind']!r}; use 'adamw' or 'muon'")

        # phase 3: collect the gathered weights
        self._finish_gathers(gather_list)

    # --- ours: input checks (upstream trusts its caller) -------------------------

    def add_param_group(self, param_group: dict) -> None:
        # Validate here (the constructor routes every group through this too) so a
        # malformed group fails at construction with a readable message, not mid-step.
        kind = param_group.get("kind")
        if kind not in _REQUIRED_KEYS:
            raise ValueError(f"MuonAdamW param group has kind={kind!r}; set 'kind' to 'adamw' or 'muon'")
        missing = [k for k in _REQUIRED_KEYS[kind] if k not in param_group]
        if missing:
            raise ValueError(f"MuonAdamW {kind} param group is missing {missing}; give every {kind} group {list(_REQUIRED_KEYS[kind])}")
        if kind == "muon":
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            param_group["params"] = params  # list() may have consumed a generator
            shapes = {tuple(p.shape) for p in params}
            if len(shapes) != 1 or len(next(iter(shapes))) != 2:
                raise ValueError(f"MuonAdamW muon group has parameter shapes {sorted(shapes)}; a muon group must hold 2D matrices of a single shape (group them by shape)")
        super().add_param_group(param_group)

    def _check_grads(self) -> None:
        for i, group in enumerate(self.param_groups):
            if group["kind"] not in _REQUIRED_KEYS:
                raise ValueError(f"Unknown optimizer kind {group['kind']!r} in param group {i}; use 'adamw' or 'muon'")
            if any(p.grad is None for p in group["params"]):
                raise RuntimeError(f"MuonAdamW.step(): a parameter in param group {i} ({group['kind']}) has no .grad; "
                                   f"run backward first, and keep parameters that get no gradient out of the optimizer")

# -----------------------------------------------------------------------------
# Ours: collectives with a gloo fallback, and the group schema MuonAdamW validates.
# The NCCL (GPU) path is exactly upstream's: asynchronous
# reduce_scatter_tensor / all_reduce with ReduceOp.AVG and all_gather_into_tensor,
# returning futures so communication overlaps with the other groups' compute.
# Gloo (our CPU multi-process tests) gets a minimal fallback: older gloo builds lack
# ReduceOp.AVG and reduce_scatter, and in torch 2.13 its reduce_scatter work object
# does not implement get_future(). So on gloo we run synchronous SUM all_reduces and
# divide, which is slower but gives the same averages, and return no future.

def _on_gloo() -> bool:
    return dist.get_backend() == "gloo"


def _all_reduce_avg(tensor: Tensor, world_size: int):
    """Average `tensor` over ranks in place. Returns a future, or None if already done."""
    if _on_gloo():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.AVG, async_op=True).get_future()


def _reduce_scatter_avg(out: Tensor, full: Tensor, world_size: int):
    """out <- this rank's dim-0 slice of the rank-average of `full`. Future or None."""
    if _on_gloo():
        rank = dist.get_rank()
        total = full.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total.div_(world_size)
        out.copy_(total.chunk(world_size, dim=0)[rank])
        return None
    return dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.AVG, async_op=True).get_future()


def _all_gather(out: Tensor, shard: Tensor):
    """out <- concatenation over ranks (dim 0) of each rank's `shard`. Future or None."""
    if _on_gloo():
        world_size = dist.get_world_size()
        # shard may be a view into out (AdamW updates its slice of p in place)
        dist.all_gather(list(out.chunk(world_size, dim=0)), shard.clone())
        return None
    return dist.all_gather_into_tensor(out, shard, async_op=True).get_future()

# -----------------------------------------------------------------------------


_REQUIRED_KEYS = {
    "adamw": ("lr", "betas", "eps", "weight_decay"),
    "muon": ("lr", "momentum", "ns_steps", "beta2", "weight_decay"),
}
