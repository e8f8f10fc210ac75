"""The slicing and rehash benchmarks' row functions (what `livecache bench suite` calls), on tiny work."""

from livecache.accel.rehash import StepRehashConfig
from livecache.bench.rehash_bench import format_table, rehash_rows
from livecache.bench.slicing_bench import slicing_rows
from livecache.bench.workloads import sd15_workload


def test_slicing_rows_report_memory_speed_and_exactness(close_reassociated):
    (row,) = slicing_rows("sd15-tiny", batch=2, slices=2, runs=1, only="vae", progress=lambda _: None)
    assert row.slices == 2 and row.max_rel_diff <= close_reassociated.bound()  # exact up to float order
    assert row.peak_mb_sliced < row.peak_mb_full and row.memory_ratio > 1.2
    assert row.seconds_full > 0 and row.speed > 0


def test_rehash_rows_report_skips_speed_and_fidelity():
    work = sd15_workload(4, tiny=True)
    rows = rehash_rows(work, "lcm", 4, [StepRehashConfig(0.0), StepRehashConfig(10.0, 1)], runs=1,
                       progress=lambda _: None)
    base, zero, high = rows
    assert base.method == "unaccelerated" and base.skipped_steps == 0
    assert zero.pattern == "FFFF" and zero.latent_psnr == float("inf") and zero.ssim == 1.0
    assert high.pattern == "FF.F" and high.skipped_steps == 1 and high.latent_psnr < float("inf")
    assert "FF.F" in format_table(rows)
