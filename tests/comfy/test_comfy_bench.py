"""`livecache bench comfy` on a tiny SD1.5-class MODEL: every row is there and the counts say what each method ran.

No timings are asserted (the machine is shared); the calls and the fidelity of the exact methods are.
"""

from __future__ import annotations

import argparse
import json

from livecache.bench import comfy_bench

STEPS = 6


def test_every_technique_and_both_peers_get_a_row(tmp_path):
    parser = argparse.ArgumentParser()
    comfy_bench.configure(parser)
    out = tmp_path / "rows.json"
    args = parser.parse_args(["--channels", "32", "--context", "64", "--size", "8", "--steps", str(STEPS),
                              "--intervals", "3", "--cachequant-full-steps", "3", "--runs", "1", "--json", str(out)])
    assert comfy_bench.main(args) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())}
    names = " | ".join(rows)
    for wanted in ("uncached fp32", "uncached bf16", "ComfyUI EasyCache", "ComfyUI LazyCache", "DeepCache N=3",
                   "step rehash", "W8A8 (int8 kernels)", "DGQ W8A8 (simulated", "Slicing ×2", "CacheQuant K=3",
                   "stack: DeepCache N=3 + W8A8", "stack: CacheQuant K=3 + Slicing"):
        assert wanted in names, (wanted, names)
    uncached = rows["uncached fp32"]
    assert uncached["psnr"] == float("inf") and uncached["deep_calls"] == uncached["unet_calls"] == STEPS
    sliced = rows["ours Slicing ×2"]
    assert sliced["psnr"] > 80 and sliced["deep_calls"] == sliced["unet_calls"] == STEPS  # same output, once per call
    assert rows["ours DeepCache N=3 uniform"]["deep_calls"] == 2  # steps 0 and 3 run the deep blocks
    cachequant = next(row for name, row in rows.items() if name.startswith("ours CacheQuant"))
    assert cachequant["deep_calls"] == 3 and cachequant["unet_calls"] == STEPS
    lazy = next(row for name, row in rows.items() if name.startswith("ComfyUI LazyCache"))
    assert lazy["unet_calls"] <= STEPS and 0 < lazy["psnr"] < float("inf")
    for row in rows.values():
        assert row["seconds"] > 0 and row["speed"] > 0 and 0 < row["ssim"] <= 1 + 1e-9, row
