"""The 8-bit GEMM backend of W8A8 (int8 `torch._int_mm`, fp8 `torch._scaled_mm`), checked on the CPU.

No GPU here: the numerics run through the same kernels on the CPU (recent torch has both there), the
CUDA rules (row padding, capability gates) are exercised by standing in for the device's capability
and by running the CUDA kernel choice on CPU tensors, and the device-following by a `meta` input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from livecache.accel import quant_gemm
from livecache.accel.quant import GEMM_LABELS, LayerRanges, QuantConfig, Quantizer, build_layer, plan_from
from livecache.accel.quant_gemm import GemmWeights, gemm, kernel_for
from livecache.accel.techniques import REGISTRY

CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU


@pytest.fixture(autouse=True)
def fresh_kernels():
    kernel_for.cache_clear()
    yield
    kernel_for.cache_clear()


def quant_bound(x2d: torch.Tensor, weight2d: torch.Tensor) -> torch.Tensor:
    """The worst-case error of symmetric per-row int8 rounding of both operands, plus float32 summation.

    With steps s_x (per token) and s_w (per channel), each operand is off by at most half a step, so
    |Δy| ≤ s_w/2·‖x‖₁ + s_x/2·‖w‖₁ + K·s_x·s_w/4 (computed here from the definition, not the code).
    """
    s_x = x2d.abs().amax(1, keepdim=True) / 127
    s_w = weight2d.abs().amax(1, keepdim=True).t() / 127
    k = x2d.shape[1]
    bound = s_w / 2 * x2d.abs().sum(1, keepdim=True) + s_x / 2 * weight2d.abs().sum(1).unsqueeze(0) + k * s_x * s_w / 4
    return bound + 1e-5 * (x2d.abs() @ weight2d.abs().t())


def gemm_layer(module: nn.Module, backend: str = "auto"):
    """The layer as a host computing on CUDA gets it (the GEMM backend), its weights left on the CPU."""
    return build_layer(module, LayerRanges(), QuantConfig(backend=backend), compute=CUDA)


@pytest.mark.parametrize("features", [(64, 48), (20, 12)])  # the second needs K and N padded
def test_int8_linear_is_within_its_quantization_bound(features):
    torch.manual_seed(0)
    linear = nn.Linear(*features)
    x = torch.randn(3, 5, features[0]) * 2
    layer = gemm_layer(linear)
    assert layer.gemm is not None and layer.path == GEMM_LABELS["int8"]
    with torch.no_grad():
        out, reference = layer.compute(linear, x), linear(x)
    assert layer.ran == "cpu int8 (torch._int_mm)"
    error = (out - reference).reshape(-1, features[1]).abs()
    assert torch.all(error <= quant_bound(x.reshape(-1, features[0]), linear.weight.detach())), error.max()
    assert not torch.equal(out, reference)  # it did quantize


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1, stride=2), dict(kernel_size=1),
                                  dict(kernel_size=3, padding=2, dilation=2)])
def test_int8_conv_by_im2col_is_within_its_quantization_bound(conv):
    torch.manual_seed(1)
    module = nn.Conv2d(6, 10, **conv)
    x = torch.randn(2, 6, 9, 7)
    layer = gemm_layer(module)
    with torch.no_grad():
        out, reference = layer.compute(module, x), module(x)
    assert out.shape == reference.shape
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    bound = quant_bound(patches.reshape(-1, patches.shape[-1]), module.weight.detach().reshape(10, -1))
    error = (out - reference).movedim(1, -1).reshape(-1, 10).abs()
    assert torch.all(error <= bound), (error - bound).max()


def test_the_kernels_agree_with_the_dequantized_product():
    """`_int_mm` sums the same integers a float matmul of the quantized operands sums (exactly, at this K);
    `_scaled_mm` (fp8) agrees with it up to the summation order."""
    torch.manual_seed(2)
    x, weight = torch.randn(33, 64), torch.randn(24, 64)
    for grid in ("int8", "fp8"):
        weights = GemmWeights.of(weight, grid)
        q_x, _ = quant_gemm.quantize_rows(x, grid)
        real = kernel_for(grid, torch.device("cpu")).mm(q_x, weights.values).float()
        plain = quant_gemm._dequantized(q_x, weights.values)
        if grid == "int8":
            assert torch.equal(real, plain)
        else:
            assert (real - plain).abs().max() <= 1e-5 * plain.abs().max()


def test_fp8_gemm_is_close_to_float():
    torch.manual_seed(3)
    linear = nn.Linear(32, 16)
    x = torch.randn(40, 32)
    layer = gemm_layer(linear, "fp8")
    with torch.no_grad():
        out, reference = layer.compute(linear, x), linear(x)
    assert layer.path == GEMM_LABELS["fp8"] and layer.ran == "cpu fp8 (torch._scaled_mm)"
    # e4m3 keeps 3 mantissa bits: each operand within 2^-4 relative of its value, the product within ~1/8
    assert (out - reference).abs().max() <= (x.abs() @ linear.weight.detach().abs().t()).max() / 8


def test_kernel_choice_per_device(monkeypatch):
    capability = [(9, 0)]
    monkeypatch.setattr(quant_gemm, "cuda_capability", lambda _device: capability[0])
    assert kernel_for("fp8", CUDA).label == "cuda fp8 (torch._scaled_mm)"
    int8 = kernel_for("int8", CUDA)
    assert int8.label == "cuda int8 (torch._int_mm)" and int8.min_rows == 17
    kernel_for.cache_clear()
    capability[0] = (8, 6)  # Ampere: int8 tensor cores, no fp8
    assert kernel_for("fp8", CUDA).label == "fp8 dequantized matmul (no fp8 kernel on cuda)"
    assert kernel_for("int8", torch.device("mps")).label == "int8 dequantized matmul (no int8 kernel on mps)"
    monkeypatch.delattr(torch, "_int_mm")  # a torch without it
    kernel_for.cache_clear()
    assert kernel_for("int8", CUDA).label == "int8 dequantized matmul (no int8 kernel on cuda)"


def test_cuda_shape_rules_hold_and_padding_changes_nothing(monkeypatch):
    """CUDA's kernel choice, run on CPU tensors: the operands it gets meet `_int_mm`'s CUDA rules
    (more than 16 rows, K and N multiples of 8) and the padded product equals the unpadded one."""
    torch.manual_seed(4)
    x, weight, bias = torch.randn(3, 20), torch.randn(12, 20), torch.randn(12)
    weights = GemmWeights.of(weight, "int8")
    expected, _ = gemm(x, weights, bias)
    cuda_kernel = kernel_for("int8", CUDA)
    shapes = []

    def recording(q_x, q_w):
        shapes.append((tuple(q_x.shape), tuple(q_w.shape)))
        return cuda_kernel.mm(q_x, q_w)

    monkeypatch.setattr(quant_gemm, "kernel_for",
                        lambda grid, device: quant_gemm.GemmKernel(cuda_kernel.label, recording, cuda_kernel.min_rows))
    out, label = gemm(x, weights, bias)
    (m, k), (n, k_w) = shapes[0]
    assert m > 16 and k % 8 == 0 and n % 8 == 0 and k == k_w
    assert label == "cuda int8 (torch._int_mm)" and out.shape == (3, 12)
    assert torch.equal(out, expected)


def test_quantized_weights_follow_the_input_device():
    """Weights kept on one device, the call on another: they travel to the input (here: `meta`, which has
    no int8 kernel, so the dequantized product runs and the label says so)."""
    linear = nn.Linear(16, 8)
    layer = gemm_layer(linear)
    assert layer.gemm.values.device.type == "cpu"
    out = layer.compute(linear, torch.empty(4, 16, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 8)
    assert layer.ran == "int8 dequantized matmul (no int8 kernel on meta)"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # no 8-bit kernel takes a grouped conv
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.depthwise(self.conv(x)).movedim(1, -1))


def test_plan_and_stats_name_the_kernels_that_ran():
    torch.manual_seed(5)
    model = Tiny()
    layers = {name: m for name, m in model.named_children()}
    plan = plan_from(QuantConfig(), model, layers, {name: LayerRanges() for name in layers}, compute=CUDA)
    assert plan.backend == (f"{GEMM_LABELS['int8']} on 2/3 layers, "
                            "simulated 8-bit (fake-quant, float compute) on 1/3 layers")
    quantizer = Quantizer(plan).apply(model, layers, lambda _a, _k: 0.0)
    try:
        with torch.no_grad():
            model(torch.randn(2, 4, 5, 5))
            model(torch.randn(2, 4, 5, 5))
    finally:
        quantizer.remove()
    assert quantizer.stats.kernels == {"cpu int8 (torch._int_mm)": 4, "simulated 8-bit (fake-quant, float compute)": 2}
    line, numbers = REGISTRY.of(plan).report(quantizer.stats, 0.1, "U-Net calls")
    assert "ran cpu int8 (torch._int_mm)" in line and numbers["kernels"]["cpu int8 (torch._int_mm)"] == 4, line


def test_asking_for_a_kernel_that_cannot_run_fails_clearly():
    with pytest.raises(ValueError, match="no 8-bit kernel here takes"):
        gemm_layer(nn.Conv2d(8, 8, 3, groups=8), "int8")
    with pytest.raises(ValueError, match="DGQ .* has no fp8 kernel"):
        QuantConfig(method="dgq", backend="fp8")
    with pytest.raises(ValueError, match="'auto', 'int8', 'fp8' or 'simulated'"):
        QuantConfig(backend="cuda")
