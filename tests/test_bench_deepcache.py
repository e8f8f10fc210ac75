"""`livecache bench deepcache` end to end on small work (speed is never asserted, only the bookkeeping)."""

import json

import pytest

from livecache.cli import main as cli_main


@pytest.mark.slow
def test_bench_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "deepcache", "--work", "sd15-tiny,embedded", "--dtypes", "fp32", "--runs", "1",
                     "--steps", "6", "--intervals", "3", "--per-class", "3", "--json", str(out)])
    assert code == 0
    rows = {(r["work"], r["method"]): r for r in json.loads(out.read_text())["rows"]}
    assert out.with_suffix(".png").stat().st_size > 1000
    for work in ("sd15-tiny", "embedded"):
        base, ours = rows[(work, "uncached")], rows[(work, "ours N=3 uniform")]
        assert base["speed"] == 1.0 and base["deep_calls"] == base["unet_calls"] == 6
        assert (ours["deep_calls"], ours["unet_calls"]) == (2, 6)  # steps 0 and 3 run the deep blocks
        assert rows[(work, "ours N=3 non-uniform")]["deep_calls"] == 2  # same budget of full steps
        authors = rows[(work, "DeepCache authors N=3")]
        if not authors["note"]:  # same schedule, same arithmetic: the same result as the authors' helper
            assert authors["latent_psnr"] == pytest.approx(ours["latent_psnr"], abs=0.01)
        for row in rows.values():
            assert row["note"] or row["latent_psnr"] is not None
    embedded = rows[("embedded", "ours N=3 uniform")]
    assert embedded["image_ssim"] is not None and embedded["fid"] is not None
    assert "DeepCache authors" in capsys.readouterr().out
