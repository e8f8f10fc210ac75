"""`livecache bench dit --comfy-root` part (c) in quick mode: ComfyUI's Flux through its KSampler, every row
present with its block calls counted (no timings asserted)."""

from __future__ import annotations

import argparse

from livecache.bench import dit_bench


def test_part_c_counts_every_rows_block_calls(comfy_root):
    parser = argparse.ArgumentParser()
    dit_bench.configure(parser)
    args = parser.parse_args(["--work", "", "--comfy-root", str(comfy_root), "--comfy-tiny", "--flux-steps", "6",
                              "--intervals", "3", "--runs", "1"])
    rows = {row.method: row for row in dit_bench.comfy_rows(args, [3])}
    full = rows["uncached fp32"].block_calls
    assert full == 6 * 5 and rows["uncached bf16"].block_calls == full  # 2 double + 3 single blocks, 6 steps
    # interval 3: 2 full steps; the span (single blocks 2-3 of 0-4) runs on those, the other 3 blocks always
    ours = ("ours block cache N=3 reuse", "ours block cache N=3 forecast", "ours CacheQuant K=2 (feature DP) + W8A8")
    for name in ours:
        assert rows[name].block_calls == 3 * 6 + 2 * 2, (name, rows[name].block_calls)
    for peer in ("EasyCache", "LazyCache"):
        assert rows[f"ComfyUI {peer} (threshold 0.2)"].block_calls < full
    assert rows["uncached fp32"].latent_psnr == float("inf")
    assert all(row.latent_psnr is not None and row.ssim is not None for row in rows.values())
