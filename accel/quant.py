"""Post-training quantization of a network's Linear/Conv2d layers: W8A8 (CacheQuant) and DGQ.

One core, two methods, one set of quantizers:

- **W8A8** (CacheQuant's structural half): weights int8, symmetric per output channel; activations
  8-bit per tensor with *dynamic* scales (each call's own min/max: a diffusion U-Net's activation
  ranges drift across timesteps, so one calibrated range is loose for most steps). With the
  `int8` backend this is *real* int8 arithmetic on CPU through torch's x86 quantized kernels:
  Linear layers use `quantized::linear_dynamic`, Conv2d layers oneDNN's `qconv_pointwise` (the
  kernel torch's x86 inductor quantization uses; AMX/VNNI int8) with float output, so no output
  requantization adds error. Off the x86 CPU path (CUDA, other CPUs, or `backend='fp8'`) W8A8 runs
  as one scaled 8-bit GEMM per layer with per-token activation scales (`quant_gemm`: int8
  `torch._int_mm`, or fp8 e4m3 `torch._scaled_mm` on CUDA devices of capability 8.9+), its kernel
  chosen per call from the input's device. The `simulated` backend computes the per-tensor
  quantization in floating point (fake-quant), for layers no kernel takes; `stats.backend` says how
  each layer was built and `stats.kernels` which kernels ran.
- **DGQ** (distribution-aware group quantization): weights at 8, 6 or 4 bits (per output channel,
  in groups of `weight_group` inputs below 8 bits); activations quantized per (pixel, group of
  `group_size` channels), while the outliers that break group scales stay in higher precision:
  *channel* outliers (the calibrated channels with the largest magnitude) and *pixel* outliers (per
  call, the pixels/tokens with the largest magnitude). Cross-attention scores use a logarithmic
  (power-of-two) quantizer, which keeps the many small probabilities a uniform grid would zero;
  the adapter installs it (`attention_bits`). DGQ has no int8 kernel here: it is always simulated.
- **Quantization-error correction** (CacheQuant's decoupled correction, quantization half): per
  layer and per calibrated noise level, a per-output-channel affine map fp ≈ a·quantized + b
  fitted by least squares on calibration data, applied at the nearest calibrated level.

Calibration (`calibrate_quant`) observes activation ranges during a caller-supplied `run()` (a few
calibration generations), builds a `QuantPlan` (the quantized weights and ranges: a value that can
be applied to the model any number of times), and with `correct=True` runs a second pass that
compares each quantized layer with its float output on the same input. `Quantizer` applies a plan
through reversible forward overrides: `remove()` leaves the model bit-identical to before. The
float weights stay in memory (nodes never mutate a shared model); `QuantPlan.size_ratio` is the
weight storage a quantized checkpoint would need, relative to fp32.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import quant_gemm
from .cache_schedule import affine_residual, fit_affine
from .forward_override import Forward, ForwardOverrides, has_approximate_override
from .quant_gemm import GemmWeights, fp8_available, int_mm_available, symmetric_scale
from .site import remove_all

QuantMethod = Literal["w8a8", "dgq"]
Backend = Literal["auto", "int8", "fp8", "simulated"]
LevelReader = Callable[[tuple[Any, ...], dict[str, Any]], float]
WEIGHT_BITS = (8, 6, 4)


@dataclass(frozen=True)
class QuantConfig:
    """What a user picks; validated on creation so bad values fail before any model is touched."""

    method: QuantMethod = "w8a8"
    weight_bits: int = 8
    act_bits: int = 8
    backend: Backend = "auto"
    group_size: int = 16  # DGQ: channels per activation group
    weight_group: int = 64  # DGQ below 8 bits: inputs per weight group (0: per output channel only)
    outlier_channels: float = 0.02  # DGQ: fraction of input channels kept in float
    outlier_pixels: float = 0.01  # DGQ: fraction of pixels/tokens per call kept in float
    attention_bits: int = 0  # DGQ: log2 quantization of cross-attention scores (0: off)
    correct: bool = False  # calibrate per-channel corrections of the quantization error

    def __post_init__(self) -> None:
        if self.method not in ("w8a8", "dgq"):
            raise ValueError(f"method must be 'w8a8' or 'dgq', got {self.method!r}")
        if self.weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be 8, 6 or 4, got {self.weight_bits!r}")
        if not isinstance(self.act_bits, int) or not 4 <= self.act_bits <= 8:
            raise ValueError(f"act_bits must be an integer in [4, 8], got {self.act_bits!r}")
        if self.method == "w8a8" and (self.weight_bits, self.act_bits) != (8, 8):
            raise ValueError(f"W8A8 means 8-bit weights and activations, got weight_bits={self.weight_bits}, "
                             f"act_bits={self.act_bits}; use method='dgq' for fewer bits")
        if self.backend not in ("auto", "int8", "fp8", "simulated"):
            raise ValueError(f"backend must be 'auto', 'int8', 'fp8' or 'simulated', got {self.backend!r}")
        if self.method == "dgq" and self.backend in ("int8", "fp8"):
            raise ValueError(f"DGQ (group-wise activations with float outliers) has no {self.backend} kernel; "
                             "use backend='simulated' or 'auto'")
        if self.group_size < 1 or self.weight_group < 0:
            raise ValueError(f"group_size must be >= 1 and weight_group >= 0, "
                             f"got {self.group_size}, {self.weight_group}")
        for name in ("outlier_channels", "outlier_pixels"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be a fraction in [0, 0.5), got {getattr(self, name)!r}")
        if self.attention_bits != 0 and not 2 <= self.attention_bits <= 8:
            raise ValueError(f"attention_bits must be 0 (off) or in [2, 8], got {self.attention_bits!r}")

    def label(self) -> str:
        if self.method == "w8a8":
            return "W8A8"
        attention = f" log{self.attention_bits}-attn" if self.attention_bits else ""
        return f"DGQ W{self.weight_bits}A{self.act_bits}{attention}"


# -- quantizers (shared by both methods) --------------------------------------------------------

def quantize_weight(weight: torch.Tensor, bits: int, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer weights per output channel (and per `group` inputs when > 0): (ints, scales).

    Returns the integer grid values as float and the scale per row/group, so `ints * scales`
    (broadcast) is the fake-quantized weight and `ints` can be packed into int8 kernels.
    """
    qmax = 2 ** (bits - 1) - 1
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    width = rows.shape[1]
    if group and group < width and width % group == 0:
        grouped = rows.reshape(rows.shape[0], width // group, group)
    else:
        grouped = rows.reshape(rows.shape[0], 1, width)
    scale = symmetric_scale(grouped, qmax)
    ints = torch.clamp(torch.round(grouped / scale), -qmax, qmax)
    return ints, scale


def uint_params(x: torch.Tensor, bits: int) -> tuple[float, int]:
    """Asymmetric per-tensor scale and zero point covering `x` (and 0), as the int8 kernels take them."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    levels = 2**bits - 1
    scale = max(high - low, 1e-8) / levels
    return scale, int(min(levels, max(0, round(-low / scale))))


def fake_quant_dynamic(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-tensor quantization with this tensor's own range (what the int8 path computes)."""
    scale, zero = uint_params(x, bits)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).to(x.dtype)


def group_fake_quant(x: torch.Tensor, bits: int, group_size: int, keep_channels: torch.Tensor | None,
                     outlier_pixels: float) -> torch.Tensor:
    """DGQ activations: `x` is [N, C] (pixels × channels); symmetric per (pixel, channel group) scales.

    Channels in `keep_channels` and the `outlier_pixels` fraction of pixels with the largest
    magnitude keep their float values and are excluded from the group scales they would inflate.
    """
    n, c = x.shape
    qmax = 2 ** (bits - 1) - 1
    inliers = x if keep_channels is None else x.masked_fill(keep_channels, 0.0)
    pad = (-c) % group_size
    padded = F.pad(inliers, (0, pad)) if pad else inliers
    groups = padded.reshape(n, -1, group_size)
    scale = symmetric_scale(groups, qmax)
    quant = (torch.clamp(torch.round(groups / scale), -qmax, qmax) * scale).reshape(n, -1)[:, :c]
    keep = torch.zeros_like(x, dtype=torch.bool)
    if keep_channels is not None:
        keep |= keep_channels
    top = math.ceil(outlier_pixels * n) if outlier_pixels > 0 else 0
    if top:
        rows = torch.topk(inliers.abs().amax(dim=1), top).indices
        keep[rows] = True
    return torch.where(keep, x, quant.to(x.dtype))


def log2_quantize(probs: torch.Tensor, bits: int) -> torch.Tensor:
    """Power-of-two quantization of probabilities in [0, 1]: p -> 2^-round(-log2 p), 2^bits levels.

    Attention probabilities span orders of magnitude; a log grid spends its levels evenly across
    them, where a uniform 8-bit grid would round every probability below 1/510 to zero.
    """
    levels = 2**bits - 1
    exponent = torch.round(-torch.log2(probs.float().clamp_min(2.0 ** -(levels + 1))))
    out = torch.where(exponent > levels - 1, torch.zeros_like(probs.float()), torch.exp2(-exponent))
    return out.to(probs.dtype)


# -- per-layer quantized compute -----------------------------------------------------------------

@dataclass
class LayerRanges:
    """What calibration observed at one layer's input (DGQ picks its outlier channels from it)."""

    channel_absmax: torch.Tensor | None = None  # per input channel

    def observe(self, x: torch.Tensor, channel_dim: int) -> None:
        x = x.detach().float()
        dims = [d for d in range(x.ndim) if d != channel_dim % x.ndim]
        absmax = x.abs().amax(dim=dims)
        self.channel_absmax = absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)


@dataclass
class LayerCorrection:
    """Per-output-channel affine corrections, one per calibrated noise level."""

    levels: torch.Tensor  # [L] calibrated noise levels, sorted
    scale: torch.Tensor  # [L, C]
    shift: torch.Tensor  # [L, C]

    def index(self, level: float) -> int:
        """The calibrated level nearest `level` (every layer of a plan shares the same levels)."""
        return int(torch.argmin((self.levels - level).abs()))


X86_LABEL = "int8 (x86 kernels: oneDNN qconv, dynamic qlinear)"
GEMM_LABELS = {"int8": "int8 GEMM (per-token activation scales; torch._int_mm where the device has it)",
               "fp8": "fp8 e4m3 GEMM (per-token activation scales; torch._scaled_mm on CUDA capability 8.9+)"}


@dataclass
class QuantLayer:
    """One Linear/Conv2d layer quantized by a plan: weights, ranges, correction; computes its output.

    Three ways to compute, fixed when the layer is built: `int8` (x86 kernels, CPU), `gemm` (int8/fp8
    GEMM, kernel per call from the input's device) or neither (simulated). `ran` names the kernel of
    the last call, which is what the stats report.
    """

    kind: Literal["linear", "conv"]
    config: QuantConfig
    int8: bool
    ranges: LayerRanges
    weight_bytes: int  # storage of the quantized weight (+ scales, + float bias)
    float_bytes: int  # the same in fp32
    fake_weight: torch.Tensor | None = None  # simulated backend
    gemm: GemmWeights | None = None  # the int8/fp8 GEMM backend
    packed: Any = None  # int8 backend: prepacked weight
    weight_scale: torch.Tensor | None = None  # int8 conv: per-output-channel weight scales
    keep_channels: torch.Tensor | None = None  # DGQ channel outliers (input channels)
    correction: LayerCorrection | None = None
    bias: torch.Tensor | None = None  # the bias quantized with the weight (a host may patch it, as it does the weight)
    ran: str = ""

    @property
    def path(self) -> str:
        """How this layer was built to compute (the plan's backend label is made of these)."""
        if self.int8:
            return X86_LABEL
        if self.gemm is not None:
            return GEMM_LABELS[self.gemm.grid]
        return f"simulated {self.config.weight_bits}-bit (fake-quant, float compute)"

    def compute(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The quantized layer's output for input `x` (the module supplies bias, stride, padding...)."""
        if self.gemm is not None:
            if self.kind == "linear":
                out, self.ran = quant_gemm.linear(x, self.gemm, self.bias)
            else:
                out, self.ran = quant_gemm.conv2d(module, x, self.gemm, self.bias)
            return out
        self.ran = self.path
        return self._int8(module, x) if self.int8 else self._simulated(module, x)

    def _simulated(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        xq = self._quant_act(x)
        # the weights stay where the host keeps the layer's weights; a host that offloads them computes
        # elsewhere, so they travel to the input's device per call, as the host's own weights do
        weight = self.fake_weight.to(device=x.device, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        if self.kind == "linear":
            return F.linear(xq, weight, bias)
        return module._conv_forward(xq, weight, bias)

    def _quant_act(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.method == "w8a8":
            return fake_quant_dynamic(x, cfg.act_bits)
        channels_last = x if self.kind == "linear" else x.movedim(1, -1)
        flat = channels_last.reshape(-1, channels_last.shape[-1])
        keep = None if self.keep_channels is None else self.keep_channels.unsqueeze(0).expand_as(flat)
        quant = group_fake_quant(flat, cfg.act_bits, cfg.group_size, keep, cfg.outlier_pixels)
        quant = quant.reshape(channels_last.shape)
        return quant if self.kind == "linear" else quant.movedim(-1, 1)

    def _int8(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.kind == "linear":
            flat = x.float().reshape(-1, x.shape[-1])
            out = torch.ops.quantized.linear_dynamic(flat, self.packed, False)
            return out.reshape(*x.shape[:-1], out.shape[-1]).to(dtype)
        scale, zero = uint_params(x, 8)
        qx = torch.clamp(torch.round(x.float() / scale) + zero, 0, 255).to(torch.uint8)
        bias = None if self.bias is None else self.bias.float()
        zeros = torch.zeros(self.weight_scale.numel(), dtype=torch.long)
        out = torch.ops.onednn.qconv_pointwise(qx, scale, zero, self.packed, self.weight_scale, zeros, bias,
                                               list(module.stride), list(module.padding), list(module.dilation),
                                               module.groups, 1.0, 0, torch.float32, "none", [], "")
        return out.to(dtype)


def int8_available() -> bool:
    """Whether torch has the x86 quantized kernels this core calls for real int8 compute."""
    engines = torch.backends.quantized.supported_engines
    return ("x86" in engines or "fbgemm" in engines) and hasattr(torch.ops.onednn, "qconv_pointwise")


def _layer_kind(module: nn.Module) -> Literal["linear", "conv"]:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    raise TypeError(f"only nn.Linear and nn.Conv2d layers can be quantized, got {type(module).__name__}")


def _compute_path(config: QuantConfig, kind: str, module: nn.Module, weight: torch.Tensor,
                  compute: torch.device) -> Literal["x86", "int8", "fp8", "simulated"]:
    """Which way a layer computes: x86 int8 kernels (weights and compute on the CPU), an 8-bit GEMM, or simulated.

    `auto` takes the x86 kernels where they apply, else the int8 GEMM where torch has `_int_mm`, else
    simulates; `int8`/`fp8` insist on real 8-bit compute and fail, naming why, where none applies.
    """
    grouped_conv = kind == "conv" and (module.groups != 1 or module.padding_mode != "zeros"
                                       or isinstance(module.padding, str))
    if config.method != "w8a8" or config.backend == "simulated":
        return "simulated"
    if grouped_conv and config.backend in ("int8", "fp8"):
        raise ValueError(f"backend={config.backend!r} was asked for but a layer is a grouped/padded-mode conv, "
                         "which no 8-bit kernel here takes: use backend='auto' or 'simulated'")
    if config.backend == "fp8":
        if not fp8_available():
            raise ValueError("backend='fp8' needs torch.float8_e4m3fn and torch._scaled_mm, which this torch "
                             f"({torch.__version__}) lacks: use backend='auto'")
        return "fp8"
    if not grouped_conv and int8_available() and weight.device.type == "cpu" and compute.type == "cpu":
        return "x86"
    if not grouped_conv and int_mm_available():
        return "int8"
    if config.backend == "int8":
        raise ValueError("backend='int8' was asked for but torch has neither its x86 quantized kernels (for "
                         "weights and compute on the CPU) nor torch._int_mm: use backend='auto' or 'simulated'")
    return "simulated"


def build_layer(module: nn.Module, ranges: LayerRanges, config: QuantConfig, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, compute: torch.device | None = None) -> QuantLayer:
    """Quantize one layer's weights for `config`, choosing real 8-bit compute where the backend allows it.

    `weight`/`bias` (default: the module's own) are what the layer computes with; a host that applies
    weight patches (ComfyUI's LoRAs) passes the patched ones. `compute` is the device the host runs the
    layer on (default: where its weights are); the x86 int8 kernels need both on the CPU, the GEMM
    backend follows each call's input wherever its weights are kept.
    """
    kind = _layer_kind(module)
    weight = (module.weight if weight is None else weight).detach()
    if bias is None:
        bias = module.bias
    bias = None if bias is None else bias.detach().float()
    bias_bytes = 0 if bias is None else 4 * bias.numel()
    group = config.weight_group if config.method == "dgq" and config.weight_bits < 8 else 0
    ints, scale = quantize_weight(weight, config.weight_bits, group)
    weight_bytes = math.ceil(weight.numel() * config.weight_bits / 8) + 4 * scale.numel() + bias_bytes
    float_bytes = 4 * weight.numel() + bias_bytes
    path = _compute_path(config, kind, module, weight, weight.device if compute is None else compute)
    use_int8 = path == "x86"
    layer = QuantLayer(kind, config, use_int8, ranges, weight_bytes, float_bytes, bias=bias)
    if use_int8:
        if torch.backends.quantized.engine not in ("x86", "fbgemm", "onednn"):
            torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
        channel_scale = scale.reshape(-1)
        if kind == "linear":
            with warnings.catch_warnings():  # torch flags quantized tensors as deprecated; the kernel still takes one
                warnings.simplefilter("ignore", UserWarning)
                q = torch._make_per_channel_quantized_tensor(ints.reshape(weight.shape).to(torch.int8),
                                                             channel_scale.double(),
                                                             torch.zeros_like(channel_scale, dtype=torch.long), 0)
            layer.packed = torch.ops.quantized.linear_prepack(q, bias)
        else:
            layer.weight_scale = channel_scale.float()
            # the input scale given here is only a hint: qconv_pointwise takes each call's own scale
            layer.packed = torch.ops.onednn.qconv_prepack(ints.reshape(weight.shape).to(torch.int8), layer.weight_scale,
                                                          1.0, 0, list(module.stride), list(module.padding),
                                                          list(module.dilation), module.groups, None)
    elif path in ("int8", "fp8"):
        layer.gemm = GemmWeights.of(weight, path, ints, scale)
    else:
        layer.fake_weight = (ints * scale).reshape(weight.shape)
    if config.method == "dgq" and config.outlier_channels > 0 and ranges.channel_absmax is not None:
        absmax = ranges.channel_absmax
        top = math.ceil(config.outlier_channels * absmax.numel())
        keep = torch.zeros(absmax.numel(), dtype=torch.bool)
        keep[torch.topk(absmax, top).indices] = True
        layer.keep_channels = keep
    return layer


# -- plan, calibration, application ----------------------------------------------------------------

@dataclass
class QuantPlan:
    """A calibrated quantization of one model's layers (by name): apply it with `Quantizer`."""

    config: QuantConfig
    fingerprint: str
    layers: dict[str, QuantLayer]
    other_float_bytes: int  # parameters left in float (first/last layers, norms, embeddings)
    correction_error: tuple[float, float] | None = None  # relative layer-output error before/after correction

    @property
    def backend(self) -> str:
        """How the layers were built to compute: one label, or each label with its share of the layers."""
        paths = Counter(layer.path for layer in self.layers.values())
        if len(paths) <= 1:
            return next(iter(paths), f"simulated {self.config.weight_bits}-bit (fake-quant, float compute)")
        return ", ".join(f"{path} on {count}/{len(self.layers)} layers" for path, count in paths.most_common())

    @property
    def size_ratio(self) -> float:
        """fp32 weight storage / quantized weight storage (all parameters of the model)."""
        quantized = sum(layer.weight_bytes for layer in self.layers.values()) + self.other_float_bytes
        full = sum(layer.float_bytes for layer in self.layers.values()) + self.other_float_bytes
        return full / quantized


@dataclass
class QuantStats:
    """What the last generations did through a quantized model."""

    label: str = ""
    backend: str = ""
    size_ratio: float = 1.0
    quantized_layers: int = 0
    calls: int = 0
    corrected: bool = False
    kernels: Counter[str] = field(default_factory=Counter)  # layer calls per kernel that ran

    def described(self) -> str:
        """The backend and, where the kernel was chosen per call (the GEMM backend), which kernels ran."""
        ran = [label for label in self.kernels if label not in self.backend]
        return self.backend if not ran else f"{self.backend}; ran {', '.join(ran)}"


class _LevelTracker:
    """The noise level of the current root call (per-level corrections read it).

    `correction` (any layer's: a plan's layers share their calibrated levels) turns the level into
    the index of the nearest calibrated level once per call instead of once per layer.
    """

    def __init__(self, correction: LayerCorrection | None = None) -> None:
        self.level: float | None = None
        self.index: int | None = None
        self._correction = correction

    def _enter(self, level: float) -> None:
        self.level = level
        self.index = None if self._correction is None else self._correction.index(level)

    def attach(self, root: nn.Module, read_level: LevelReader) -> list[torch.utils.hooks.RemovableHandle]:
        return [root.register_forward_pre_hook(lambda _m, a, k: self._enter(read_level(a, k)), with_kwargs=True),
                root.register_forward_hook(lambda *_: self._enter_none())]

    def _enter_none(self) -> None:
        self.level = self.index = None


def run_hooked(hooks: list[torch.utils.hooks.RemovableHandle], run: Callable[[], None]) -> None:
    """`run()` with calibration hooks installed; the hooks go whatever happens (the model is the user's)."""
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()


def calibrate_quant(config: QuantConfig, root: nn.Module, layers: dict[str, nn.Module], read_level: LevelReader,
                    run: Callable[[], None], fingerprint: str = "") -> QuantPlan:
    """Observe activation ranges while `run()` runs calibration generations, then build the plan.

    With `config.correct`, `run()` is called a second time to fit the per-channel, per-level
    corrections of each quantized layer against its float output on the same inputs.
    """
    if not layers:
        raise ValueError("no layers to quantize")
    ranges = {name: LayerRanges() for name in layers}
    hooks = [module.register_forward_hook(
        lambda m, args, _out, n=name: ranges[n].observe(args[0], -1 if isinstance(m, nn.Linear) else 1))
        for name, module in layers.items()]
    run_hooked(hooks, run)
    missing = [name for name, r in ranges.items() if r.channel_absmax is None]
    if missing:
        raise ValueError(f"calibration never reached layer {missing[0]} (and {len(missing) - 1} more): "
                         "the calibration run must call the model")
    plan = plan_from(config, root, layers, ranges, fingerprint)
    if config.correct:
        plan.correction_error = _fit_corrections(plan, root, layers, read_level, run)
    return plan


def plan_from(config: QuantConfig, root: nn.Module, layers: dict[str, nn.Module], ranges: dict[str, LayerRanges],
              fingerprint: str = "", weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
              compute: torch.device | None = None) -> QuantPlan:
    """The plan quantizing `layers` of `root` with observed `ranges` (no corrections).

    `weights` (name -> (weight, bias)) replaces the modules' own tensors where a host computes with
    patched ones (ComfyUI's LoRAs and other weight patches); `compute` is where the host runs the layers
    when that is not where their weights are (an offloading host).
    """
    weights = weights or {}
    built = {name: build_layer(module, ranges[name], config, *weights.get(name, (None, None)), compute=compute)
             for name, module in layers.items()}
    quantized_params = {id(p) for m in layers.values() for p in m.parameters(recurse=False)}
    other = sum(4 * p.numel() for p in root.parameters() if id(p) not in quantized_params)
    return QuantPlan(config, fingerprint, built, other)


def _fit_corrections(plan: QuantPlan, root: nn.Module, layers: dict[str, nn.Module], read_level: LevelReader,
                     run: Callable[[], None]) -> tuple[float, float]:
    """Second calibration pass: per layer and level, least squares fp_out ≈ a·quant_out + b per channel."""
    tracker = _LevelTracker()
    sums: dict[str, dict[float, torch.Tensor]] = {name: {} for name in layers}

    def observe(name: str, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        if tracker.level is None:
            return
        layer = plan.layers[name]
        with torch.no_grad():
            quant = layer.compute(module, args[0])
        x = _channels_first(quant, layer.kind)
        y = _channels_first(out, layer.kind)
        n = torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64)
        s = torch.stack([n, x.sum(1), y.sum(1), (x * x).sum(1), (x * y).sum(1), (y * y).sum(1)])
        table = sums[name]
        table[tracker.level] = table.get(tracker.level, 0) + s

    hooks = tracker.attach(root, read_level)
    hooks += [module.register_forward_hook(lambda m, a, o, n=name: observe(n, m, a, o))
              for name, module in layers.items()]
    run_hooked(hooks, run)
    before = after = reference = 0.0
    for name, table in sums.items():
        levels = sorted(table)
        scales, shifts = [], []
        for level in levels:
            n, sx, sy, sxx, sxy, syy = table[level]
            a, b = fit_affine(n, sx, sy, sxx, sxy)
            scales.append(a.float())
            shifts.append(b.float())
            reference += float(syy.sum())
            before += float((syy - 2 * sxy + sxx).sum())
            after += float(affine_residual(n, sx, sy, sxx, sxy, syy, a, b).sum())
        plan.layers[name].correction = LayerCorrection(torch.tensor(levels), torch.stack(scales), torch.stack(shifts))
    return before / max(reference, 1e-30), after / max(reference, 1e-30)


def _channels_first(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Output channels first, everything else flattened, float64 (for the least-squares sums)."""
    t = t.detach().double()
    t = t.movedim(-1, 0) if kind == "linear" else t.movedim(1, 0)
    return t.reshape(t.shape[0], -1)


class Quantizer:
    """A `QuantPlan` applied to a model through reversible forward overrides."""

    def __init__(self, plan: QuantPlan, correct: bool = True) -> None:
        self.plan = plan
        self.correct = correct and any(layer.correction is not None for layer in plan.layers.values())
        self.stats = QuantStats(plan.config.label(), plan.backend, plan.size_ratio, len(plan.layers),
                                corrected=self.correct)
        self._overrides = ForwardOverrides()
        corrections = [layer.correction for layer in plan.layers.values() if layer.correction is not None]
        self._tracker = _LevelTracker(corrections[0] if self.correct else None)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def apply(self, root: nn.Module, layers: dict[str, nn.Module], read_level: LevelReader) -> Quantizer:
        if self._hooks:
            raise RuntimeError("this Quantizer is already applied; remove() it first")
        unknown = sorted(set(layers) ^ set(self.plan.layers))
        if unknown:
            raise ValueError(f"this quantization plan does not match the model (layer {unknown[0]!r} differs): "
                             "calibrate it for this model")
        for name, module in layers.items():
            if has_approximate_override(module):
                raise ValueError(f"layer {name} already has a forward override that changes its results "
                                 "(the model is quantized already?); remove the other technique first")
            self._overrides.install(module, lambda original, n=name, m=module: self._forward(self.plan.layers[n], m))
        self._hooks = self._tracker.attach(root, read_level)
        self._hooks.append(root.register_forward_pre_hook(lambda *_: self._count()))
        return self

    def _count(self) -> None:
        self.stats.calls += 1

    def _forward(self, layer: QuantLayer, module: nn.Module) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            y = layer.compute(module, x)
            self.stats.kernels[layer.ran] += 1
            index = self._tracker.index
            if index is not None and layer.correction is not None:
                view = (-1,) if layer.kind == "linear" else (-1, 1, 1)
                scale, shift = layer.correction.scale[index], layer.correction.shift[index]
                y = torch.addcmul(shift.to(y.dtype).view(view), y, scale.to(y.dtype).view(view))
            return y

        return forward

    def remove(self) -> None:
        self._overrides.restore()
        remove_all(self._hooks)
