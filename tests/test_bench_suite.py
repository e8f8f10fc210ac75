"""`livecache bench suite` end to end on the tiny SD-shaped U-Net (bookkeeping only; speed is never asserted)."""

import json
import math

import pytest

from livecache.cli import main as cli_main


@pytest.mark.slow
def test_suite_bench_writes_every_row_with_its_columns(tmp_path, capsys):
    out = tmp_path / "suite.json"
    code = cli_main(["bench", "suite", "--work", "sd15-tiny", "--sd15-steps", "4", "--sd15-size", "8", "--runs", "1",
                     "--interval", "2", "--calibration-seeds", "101", "--json", str(out)])
    assert code == 0
    rows = {r["method"].strip(): r for r in json.loads(out.read_text())["rows"]}
    assert out.with_suffix(".png").stat().st_size > 1000
    base = rows["uncached fp32"]
    assert base["speed"] == 1.0 and base["memory_ratio"] == 1.0 and math.isinf(base["latent_psnr"])
    expected = ["uncached bf16", "DeepCache uniform K=2", "DeepCache DP K=2", "DeepCache DP K=2 (feature objective)",
                "W8A8", "CacheQuant K=2",
                "ablation: no correction", "ablation: cache corr. only", "ablation: quant corr. only",
                "DGQ W8A8 log8-attn", "DGQ W6A8 log8-attn", "DGQ W4A8 log8-attn", "step rehash reuse thr 0.1",
                "slicing batch ×2", "stack: W8A8 + DeepCache K=2 + slicing", "stack: CacheQuant K=2 + slicing"]
    for name in expected:
        row = rows[name]
        assert row["speed"] > 0 and row["peak_mb"] > 0 and len(row["times"]) == 1, name
        assert row["latent_psnr"] > 20, name  # every technique stays close to the uncached latent
    assert rows["DeepCache uniform K=2"]["note"] == "F.F."
    assert rows["DeepCache DP K=2"]["note"].count("F") == 2  # the same budget of full steps, chosen by DP
    assert rows["slicing batch ×2"]["latent_psnr"] > 100  # slicing computes the same result
    # quantized weights: 8-bit ≈ 4× smaller, fewer bits smaller still
    sizes = [rows[f"DGQ W{b}A8 log8-attn"]["size_ratio"] for b in (8, 6, 4)]
    assert 3 < sizes[0] < sizes[1] < sizes[2]
    assert "cache error on calibration" in rows["CacheQuant K=2"]["note"]
    # the peak covers the sampler loop, not applying the technique: int8 weights must not look bigger than fp32
    assert rows["W8A8"]["memory_ratio"] < 1.5
    for name, row in rows.items():
        if row["family"] == "peer":
            assert row["note"] or row["speed"] is not None, name  # a peer runs or says why it cannot
    assert "diffusers PyramidAttentionBroadcast" in capsys.readouterr().out
