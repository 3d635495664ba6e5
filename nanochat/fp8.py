"""
FP8 training for nanochat's linear layers: tensorwise dynamic scaling, nothing else.

This is a small stand-in for torchao's Float8Linear with the same entry points
(Float8LinearConfig.from_recipe_name, convert_to_float8_training), covering only the
"tensorwise" recipe: one scale per tensor, recomputed from the tensor's amax each call.

A linear layer does three matmuls per training step:
    forward     out    = x  @ W.T
    backward    grad_x = gO @ W
                grad_W = gO.T @ x
Each one here quantises its operands to fp8 (scale = fp8_max / amax, saturate, cast)
and runs torch._scaled_mm, which applies the inverse scales inside the cuBLAS kernel.
Activations and weights use float8_e4m3fn (more mantissa); gradients use float8_e5m2
(more range). _scaled_mm wants its first operand row-major and its second column-major;
W.t() of a contiguous W is already column-major, other operands get rearranged.

Everything happens inside one autograd.Function that torch.compile treats as an opaque
node (allow_in_graph): simpler than torchao's tensor subclass, at the price that Inductor
cannot fuse the amax/scale/cast glue into neighbouring ops. Eager numerics are the
same kernel calls. Running it needs a CUDA GPU with fp8 support (H100 and newer);
converting a model does not.
"""

import torch
import torch.nn as nn

from nanochat.common import COMPUTE_DTYPE

# floor on amax, so an all-zero tensor does not produce an infinite scale
EPS = 1e-12


@torch.no_grad()
def _to_fp8(x, fp8_dtype):
    """Quantise x to fp8 with a single (tensorwise) scale.
    Returns (x_fp8, inverse_scale), the pair torch._scaled_mm consumes."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = x.float().abs().max()
    # divide in float64: otherwise compiled and eager code can round the scale differently
    scale = fp8_max / amax.double().clamp(min=EPS)
    scale = scale.float()
    # clamp before the cast: a plain cast to fp8 does not saturate
    x_scaled = x.float() * scale
    x_clamped = x_scaled.clamp(-fp8_max, fp8_max)
    x_fp8 = x_clamped.to(fp8_dtype)
    # _scaled_mm multiplies by the inverse scale to bring the product back to the real range
    inv_scale = scale.reciprocal()
    return x_fp8, inv_scale


def _to_col_major(x):
    """Same 2D tensor, column-major memory (strides (1, rows)), as _scaled_mm's second operand needs."""
    return x.t().contiguous().t()


# torch.compile sees one opaque node here (see the module docstring for the trade-off)
@torch._dynamo.allow_in_graph
class _Float8Matmul(torch.autograd.Function):
    """x @ W.T with all three GEMMs of forward and backward in fp8."""

    @staticmethod
    def forward(ctx, input_2d, weight):
        input_fp8, input_inv = _to_fp8(input_2d, torch.float8_e4m3fn)
        weight_fp8, weight_inv = _to_fp8(weight, torch.float8_e4m3fn)
        ctx.save_for_backward(input_fp8, input_inv, weight_fp8, weight_inv)

        # input_fp8 (M, K) is row-major; weight_fp8.t() (K, N) is column-major for free
        output = torch._scaled_mm(
            input_fp8,
            weight_fp8.t(),
            scale_a=input_inv,
            scale_b=weight_inv,
            out_dtype=input_2d.dtype,
            # faster low-precision accumulation is fine for the forward pass; the
            # backward GEMMs below accumulate precisely
            use_fast_accum=True,
        )
        return output

    @staticmethod
    def backward(ctx, grad_output):
        in_fp8, in_inv, w_fp8, w_inv = ctx.saved_tensors

        # grad_input (M, K) = gO (M, N) @ W (N, K); gradients in e5m2, W made column-major
        go_fp8, go_inv = _to_fp8(grad_output, torch.float8_e5m2)
        w_col = _to_col_major(w_fp8)
        grad_input = torch._scaled_mm(
            go_fp8,
            w_col,
            scale_a=go_inv,
            scale_b=w_inv,
            out_dtype=grad_output.dtype,
            use_fast_accum=False,
        )

        # grad_weight (N, K) = gO.T (N, M) @ x (M, K); gO.T made row-major, x column-major
        go_T = go_fp8.t().contiguous()
        in_col = _to_col_major(in_fp8)
        grad_weight = torch._scaled_mm(
            go_T,
            in_col,
            scale_a=go_inv,
            scale_b=in_inv,
            out_dtype=grad_output.dtype,
            use_fast_accum=False,
        )

        return grad_input, grad_weight


class Float8Linear(nn.Linear):
    """An nn.Linear whose matmul runs in fp8. Weight (and bias) keep their own precision;
    only the GEMMs are quantised."""

    def forward(self, input):
        # _scaled_mm needs a reduced-precision input, and there is no autocast to provide it
        input = input.to(COMPUTE_DTYPE)
        # _scaled_mm is 2D only: fold the leading dims
        orig_shape = input.shape
        input_2d = input.reshape(-1, orig_shape[-1])
        output = _Float8Matmul.apply(input_2d, self.weight)
        output = output.reshape(*orig_shape[:-1], output.shape[-1])
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output

    @classmethod
    def from_float(cls, mod):
        """Wrap an existing nn.Linear, sharing (not copying) its weight and bias."""
        # build the shell on meta so no throwaway weight is allocated, then point it at mod's tensors
        with torch.device("meta"):
            new_mod = cls(mod.in_features, mod.out_features, bias=False)
        new_mod.weight = mod.weight
        new_mod.bias = mod.bias
        return new_mod


class Float8LinearConfig:
    """torchao-compatible config object; only the 'tensorwise' recipe exists here."""

    @staticmethod
    def from_recipe_name(recipe_name):
        if recipe_name != "tensorwise":
            raise ValueError(
                f"Only 'tensorwise' recipe is supported, got '{recipe_name}'. "
                f"Rowwise/axiswise recipes require the full torchao library."
            )
        return Float8LinearConfig()


def convert_to_float8_training(module, *, config=None, module_filter_fn=None):
    """
    Swap every nn.Linear under `module` for a Float8Linear sharing the same parameters,
    in place, and return `module`. Children are visited before their parents.

    config: a Float8LinearConfig (accepted for torchao API compatibility; tensorwise only)
    module_filter_fn(linear, fqn) -> bool: convert only where it returns True, e.g. to
        skip layers whose dims are not multiples of 16 (an fp8 GEMM requirement).
    """
    def _convert(mod, prefix=""):
        for name, child in mod.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            _convert(child, fqn)
            if isinstance(child, nn.Linear) and not isinstance(child, Float8Linear):
                if module_filter_fn is None or module_filter_fn(child, fqn):
                    setattr(mod, name, Float8Linear.from_float(child))

    _convert(module)
    return module
