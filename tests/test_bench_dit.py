"""`livecache bench dit` end to end on the tiny Flux-shaped transformer (bookkeeping only; speed is never asserted)."""

import json
import math

import pytest
import torch

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
    for name in ("stack: W8A8 + block cache DP K=2", "stack: W8A8 + forecast o1 DP K=2"):
        assert rows[name]["block_calls"] == 12, name
    # our int8 under MagCache: MagCache's skips, W8A8's numbers (the latent moves off MagCache's own)
    mag, hybrid = rows["diffusers MagCache (calibrated)"], rows["diffusers MagCache + our W8A8"]
    assert hybrid["block_calls"] == mag["block_calls"] < 16
    assert hybrid["latent_psnr"] < mag["latent_psnr"]
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


def test_profile_trajectory_reads_norms_changes_and_cosines_from_the_gram_matrix():
    from livecache.bench.dit_profile import trajectory

    r = torch.randn(5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r[3] = r[2]  # an unchanged step: change 0, cosine 1
    steps = trajectory(r @ r.T)
    assert [s["step"] for s in steps] == list(range(5)) and "change" not in steps[0]
    for i in range(1, 5):
        assert steps[i]["norm"] == pytest.approx(float(r[i].norm()), rel=1e-9)
        assert steps[i]["change"] == pytest.approx(float((r[i] - r[i - 1]).norm() / r[i].norm()), rel=1e-6, abs=1e-7)
        cosine = float(torch.nn.functional.cosine_similarity(r[i], r[i - 1], dim=0))
        assert steps[i]["cosine"] == pytest.approx(cosine, rel=1e-9)
    assert steps[3]["change"] < 1e-6 and steps[3]["cosine"] == pytest.approx(1.0)


@pytest.mark.slow
def test_dit_bench_profile_measures_the_oracle_ceiling_beside_reuse(tmp_path):
    out = tmp_path / "profile.json"
    assert cli_main(["bench", "dit", "--work", "flux-tiny", "--flux-steps", "4", "--intervals", "2", "--profile",
                     "--json", str(out)]) == 0
    (profile,) = json.loads(out.read_text())["profiles"]
    assert profile["work"] == "flux-tiny" and len(profile["steps"]) == 4
    assert all(0 < s["cosine"] <= 1 + 1e-9 and s["change"] >= 0 for s in profile["steps"][1:])
    rows = {r["method"]: r for r in profile["rows"]}
    assert rows["uncached fp32"]["psnr"] is None and rows["uncached fp32"]["block_calls"] == 16
    for label in ("uniform", "DP"):
        for name in (f"block cache {label} K=2", f"fitted forecast {label} K=2", f"oracle fit (last 2) {label} K=2",
                     f"oracle fit (last 8) {label} K=2"):
            assert rows[name]["block_calls"] == 12 and 20 < rows[name]["psnr"] < math.inf, name
    assert rows["oracle fit (last 8) oracle DP K=2"]["schedule"].count("F") == 2
