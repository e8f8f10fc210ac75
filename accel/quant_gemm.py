"""W8A8 as one scaled GEMM per layer: int8 (`torch._int_mm`) or fp8 e4m3 (`torch._scaled_mm`) operands.

The math, the same for every kernel: activations are quantized per *token* (each row of the layer's
input matrix gets its own symmetric scale, from that call's values), weights per *output channel*; the
kernel multiplies the 8-bit operands (int32 or fp32 accumulation), and the product is rescaled by the
outer product of the two scale vectors, then the float bias is added:

    y[m, n] = s_x[m] · s_w[n] · Σ_k q_x[m, k] · q_w[n, k] + b[n]

Conv2d layers take the im2col route (`F.unfold`): each output pixel's receptive patch is a token, the
weight a [out, in·kh·kw] matrix. That costs kh·kw times the input activation in float while a layer
runs (a 3×3 conv: 9×), the price of running every conv on the int8/fp8 GEMM instead of in float.

Which kernel runs is decided per call from the *input's* device, because hosts move weights between
devices (ComfyUI offloads and loads them per run): the quantized weights travel to the input's device
as the host's own weights would, then
- `int8` grid: `torch._int_mm` on CUDA (it needs more than 16 rows and K, N multiples of 8: rows are
  padded to 17, and K, N are padded to multiples of 16 once when the weights are quantized) and on
  the CPU (recent torch has it there too);
- `fp8` grid: `torch._scaled_mm` on CUDA devices of compute capability 8.9 or newer (and on the CPU,
  where torch implements it), with unit scales and the rescale above;
- anywhere else (a device or torch build without the kernel): the same quantized operands multiplied
  in float (`dequantized`), so the numbers stay those of the quantization, and the label says so.
Every choice is guarded: nothing here is required for a plan to run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Grid = Literal["int8", "fp8"]
QMAX: dict[str, float] = {"int8": 127.0, "fp8": 448.0}  # largest value of each grid (e4m3fn: 448)
ALIGN = 16  # K and N of the stored weights are padded to multiples of this (both kernels' CUDA rule)
Mm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (q_x [M, K], q_w [N, K]) -> unscaled [M, N]


def symmetric_scale(rows: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row symmetric scale (absmax / qmax over the last dim, kept): what every symmetric quantizer here uses."""
    return rows.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax


def quantize_rows(rows: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D float tensor onto `grid`: (values in the grid's dtype, scales [R, 1])."""
    rows = rows.float()
    scale = symmetric_scale(rows, QMAX[grid])
    scaled = rows / scale
    if grid == "int8":
        return torch.round(scaled).clamp_(-127, 127).to(torch.int8), scale
    return scaled.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def fp8_available() -> bool:
    """Whether this torch has the float8 e4m3 dtype and `_scaled_mm` (the fp8 grid needs both)."""
    return hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")


def int_mm_available() -> bool:
    return hasattr(torch, "_int_mm")


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (a function, so tests can stand in for a GPU)."""
    return torch.cuda.get_device_capability(device)


@dataclass(frozen=True)
class GemmWeights:
    """One layer's weights on a GEMM grid: values [Np, Kp] (zero-padded to `ALIGN`), scales [Np, 1], true N and K."""

    grid: Grid
    values: torch.Tensor
    scale: torch.Tensor
    out_features: int
    in_features: int

    @classmethod
    def of(cls, weight: torch.Tensor, grid: Grid, int8_values: torch.Tensor | None = None,
           int8_scale: torch.Tensor | None = None) -> GemmWeights:
        """Quantize `weight` ([out, ...]) per output channel; the int8 grid reuses the plan's integer weights."""
        rows = weight.detach().float().reshape(weight.shape[0], -1)
        n, k = rows.shape
        pad_n, pad_k = (-n) % ALIGN, (-k) % ALIGN
        if grid == "int8" and int8_values is not None and int8_scale is not None:
            values, scale = int8_values.reshape(n, k), int8_scale.reshape(n, 1).float()
            values = F.pad(values.float(), (0, pad_k, 0, pad_n)).to(torch.int8)
        else:
            values, scale = quantize_rows(F.pad(rows, (0, pad_k, 0, pad_n)), grid)
        scale = F.pad(scale, (0, 0, 0, pad_n), value=1.0)
        return cls(grid, values, scale, n, k)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + 4 * self.scale.numel()


@dataclass(frozen=True)
class GemmKernel:
    """The matmul one device runs for one grid, and the row count it needs (CUDA's `_int_mm`: more than 16)."""

    label: str
    mm: Mm
    min_rows: int = 1


def _int_mm(q_x: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(q_x, q_w.t())


def _scaled_mm(q_x: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    one = torch.ones((), device=q_x.device, dtype=torch.float32)
    return torch._scaled_mm(q_x, q_w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)


def _dequantized(q_x: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    return q_x.float() @ q_w.float().t()


@lru_cache(maxsize=32)
def kernel_for(grid: Grid, device: torch.device) -> GemmKernel:
    """The GEMM `grid`'s operands run with on `device` (see the module docstring for the rules)."""
    kind = device.type
    if grid == "int8" and int_mm_available() and kind in ("cuda", "cpu"):
        return GemmKernel(f"{kind} int8 (torch._int_mm)", _int_mm, 17 if kind == "cuda" else 1)
    if grid == "fp8" and fp8_available() and (kind == "cpu" or (kind == "cuda" and cuda_capability(device) >= (8, 9))):
        return GemmKernel(f"{kind} fp8 (torch._scaled_mm)", _scaled_mm)
    return GemmKernel(f"{grid} dequantized matmul (no {grid} kernel on {kind})", _dequantized)


def gemm(x2d: torch.Tensor, weights: GemmWeights, bias: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """y = x2d @ Wᵀ + b through the 8-bit GEMM on `x2d`'s device: (float32 [M, N], the kernel's label)."""
    device = x2d.device
    kernel = kernel_for(weights.grid, device)
    m = x2d.shape[0]
    rows = F.pad(x2d.float(), (0, weights.values.shape[1] - weights.in_features, 0, max(0, kernel.min_rows - m)))
    q_x, s_x = quantize_rows(rows, weights.grid)
    q_w = weights.values.to(device)
    out = kernel.mm(q_x, q_w).float()[:m, : weights.out_features]
    out = out * s_x[:m] * weights.scale.to(device)[: weights.out_features].t()
    if bias is not None:
        out = out + bias.to(device=device, dtype=torch.float32)
    return out, kernel.label


def linear(x: torch.Tensor, weights: GemmWeights, bias: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """A Linear layer on the GEMM: every leading index of `x` is a token."""
    out, label = gemm(x.reshape(-1, x.shape[-1]), weights, bias)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype), label


def conv2d(module: nn.Conv2d, x: torch.Tensor, weights: GemmWeights,
           bias: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """A (groups=1, zero-padded) Conv2d on the GEMM by im2col: each output pixel's patch is a token."""
    batch, _, height, width = x.shape
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, C·kh·kw, L]
    out, label = gemm(patches.transpose(1, 2).reshape(-1, patches.shape[1]), weights, bias)
    size = [(length + 2 * pad - dil * (k - 1) - 1) // step + 1 for length, pad, dil, k, step in
            zip((height, width), module.padding, module.dilation, module.kernel_size, module.stride, strict=True)]
    return out.reshape(batch, size[0] * size[1], -1).transpose(1, 2).reshape(batch, -1, *size).to(x.dtype), label
