"""`livecache bench dit` end to end on the tiny Flux-shaped transformer (bookkeeping only; speed is never asserted)."""

import json
import math

import pytest

from livecache.cli import main as cli_main


@pytest.mark.slow
def test_dit_bench_writes_every_row_with_its_columns(tmp_path):
    out = tmp_path / "dit.json"
    code = cli_main(["bench", "dit", "--work", "flux-tiny", "--flux-steps", "4", "--intervals", "2", "--runs", "1",
                     "--json", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert out.with_suffix(".png").stat().st_size > 1000
    base = rows["uncached fp32"]
    assert base["speed"] == 1.0 and math.isinf(base["latent_psnr"]) and base["ssim"] == 1.0
    assert base["block_calls"] == 4 * 4  # 4 steps × (1 double + 3 single blocks)
    ours = [name for name, row in rows.items() if row["family"] == "ours"]
    for name in ["uncached bf16", *ours]:
        row = rows[name]
        assert row["speed"] > 0 and len(row["times"]) == 1 and row["latent_psnr"] > 20, name
    # K=2 of 4 steps: the 2 middle blocks of the default span are skipped on 2 cached steps
    for name in ("block cache uniform K=2", "forecast o1 uniform K=2", "forecast o2 DP K=2", "fitted forecast DP K=2"):
        assert rows[name]["block_calls"] == 2 * 4 + 2 * 2, name
    assert rows["block cache uniform K=2"]["note"] == "F.F."
    assert rows["block cache DP K=2"]["note"].count("F") == 2  # the same budget of full steps, chosen by DP
    assert rows["W8A8"]["block_calls"] == 16 and rows["W8A8"]["latent_psnr"] < math.inf
    for name, row in rows.items():
        if row["family"] == "peer":
            assert row["note"] or row["speed"] is not None, name  # a peer runs or says why it cannot
    assert {"diffusers FirstBlockCache thr 0.2", "diffusers TaylorSeer interval 3"} <= set(rows)
    # part (c), ComfyUI's Flux through its sampler, needs --comfy-root: tests/comfy/test_comfy_dit_bench.py


@pytest.mark.slow
def test_dit_bench_counts_and_fidelity_only_for_the_chosen_rows(tmp_path):
    """--runs 0 times nothing (speed stays empty), --only keeps uncached fp32 and the named rows."""
    out = tmp_path / "dit.json"
    code = cli_main(["bench", "dit", "--work", "flux-tiny", "--flux-steps", "4", "--intervals", "2", "--runs", "0",
                     "--only", "fitted forecast", "--no-peers", "--json", str(out)])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"uncached fp32", "fitted forecast uniform K=2", "fitted forecast non-uniform K=2",
                         "fitted forecast DP K=2"}
    for name, row in rows.items():
        assert row["speed"] is None and row["times"] == [], name
        assert row["latent_psnr"] > 20, name
    assert rows["uncached fp32"]["block_calls"] == 16
    assert rows["fitted forecast uniform K=2"]["block_calls"] == rows["fitted forecast DP K=2"]["block_calls"] == 12
