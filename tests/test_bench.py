"""`pysdcpp bench`: the statistics on recorded timings, failure isolation, the report's shape, bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pysdcpp.bench import format_model_table, model_bench, psnr, run_variant, summarize
from pysdcpp.cli import main


def _run(phases: dict, steps=(1.0,), rss=100, image=None):
    return {"ok": True, "phases": phases, "steps": list(steps), "peak_rss": rss,
            "image": image if image is not None else np.zeros((2, 2, 3), np.uint8)}


def test_summary_medians_and_pairwise_speedups():
    img = np.full((4, 4, 3), 100, np.uint8)
    other = img.copy()
    other[0, 0, 0] = 110
    runs = {
        "upstream": [_run({"total": 10.0, "sampling": 6.0}, image=img), _run({"total": 12.0, "sampling": 8.0}),
                     _run({"total": 20.0, "sampling": 9.0})],
        "fast": [_run({"total": 5.0, "sampling": 2.0}, steps=(0.5, 0.7), rss=300, image=other),
                 _run({"total": 4.0, "sampling": 4.0}), {"ok": False, "error": "boom"}],
    }
    s = summarize(runs, "upstream")
    assert s["upstream"]["phases"]["total"] == {"median": 12.0, "min": 10.0, "max": 20.0}
    # Ratios repetition by repetition (10/5, 12/4), the failed third pair dropped: median 2.5.
    assert s["fast"]["speedup"]["total"] == pytest.approx(2.5)
    assert s["fast"]["speedup"]["sampling"] == pytest.approx((3.0 + 2.0) / 2)
    assert s["fast"]["failed"] == ["boom"]
    assert s["fast"]["step"]["median"] == pytest.approx(0.7)  # steps of all good runs: 0.5, 0.7, 1.0
    assert s["fast"]["peak_rss"] == 300
    assert s["fast"]["max_abs_diff_vs_upstream"] == 10
    assert s["fast"]["psnr_vs_upstream"] == pytest.approx(10 * np.log10(255**2 / (100 / 48)))
    assert psnr(img, img) == float("inf")


def test_failing_and_hanging_variants_are_reported(sd15_f16):
    params = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}
    r = run_variant({"backend": "accelerated", "conv": "fft"}, str(sd15_f16), params, 1, timeout=120)
    assert r["ok"] is False and "conv must be one of" in r["error"]
    r = run_variant({"backend": "upstream"}, str(sd15_f16), params, 1, timeout=0.5)
    assert r["ok"] is False and "timed out" in r["error"]


def test_model_bench_report(sd15_f16, tmp_path):
    from PIL import Image

    from pysdcpp.bench import plot_report

    report = model_bench(str(sd15_f16), ["upstream", "im2col@2"], size=64, steps=1, threads=2, repeat=1)
    plot_report(report, tmp_path / "chart.png")
    assert Image.open(tmp_path / "chart.png").size[0] > 600
    json.dumps(report, default=float)  # serialisable
    assert report["baseline"] == "upstream" and report["machine"]["logical_cores"] >= 1
    for name in ("upstream", "im2col@2"):
        e = report["summary"][name]
        assert not e["failed"], e["failed"]
        assert {"model_load", "text_encoding", "sampling", "vae_decode", "total"} <= set(e["phases"])
        assert e["peak_rss"] > 100 << 20
        assert e["compute_buffers_mb"].get("unet", 0) > 0
    # A variant's own step count (name@steps) reaches its generation.
    assert report["variants"]["im2col@2"]["steps"] == 2
    assert len(report["runs"]["im2col@2"][0]["steps"]) == 2 and len(report["runs"]["upstream"][0]["steps"]) == 1


def test_step_cache_variant_reports_its_mac_share(sd15_f16):
    report = model_bench(str(sd15_f16), ["upstream", "upstream-ucache@8"], size=64, steps=8, threads=2, repeat=1)
    e = report["summary"]["upstream-ucache@8"]
    assert not e["failed"], e["failed"]
    c = e["step_cache"]
    assert c["spec"] == "ucache" and c["steps"] == 8 and 0 <= c["skipped_steps"] < 8
    assert c["fraction_of_dense_macs"] == (8 - c["skipped_steps"]) / 8
    assert "step_cache" not in report["summary"]["upstream"]
    row = next(line for line in format_model_table(report).splitlines() if line.startswith("upstream-ucache@8"))
    assert f"{100 * c['fraction_of_dense_macs']:.0f}%" in row


def test_linear_bench_report():
    """The linear-layer benchmark at a small size: every distinct shape once, both paths timed, errors against
    float64 within each path's bound, and the report renders."""
    from pysdcpp.bench import format_linear_table, linear_bench, sd15_linear_shapes
    from pysdcpp.bench_report import render

    report = linear_bench(size=128, threads=2, repeat=1)
    shapes = sd15_linear_shapes(128)
    assert len(report["rows"]) == len(shapes) and (256, 320, 2560) in shapes  # 16x16 latent: 256 tokens
    for row in report["rows"]:
        assert row["median_s"]["upstream"] > 0 and row["median_s"]["fast"] > 0
        assert row["max_error"]["fast"] <= 1e-5 and row["max_error"]["upstream"] <= 2e-3
    assert "x fast" in format_linear_table(report)
    assert "Linear layers of SD1.5's UNet at 128 px" in render([json.loads(json.dumps(report))])


@pytest.mark.parametrize("args, message", [
    (["--size", "100"], "multiple of 64"),
    (["--repeat", "0"], "at least 1"),
    (["--variants", "upstream,warp"], "unknown variant"),
    (["--variants", "upstream@0"], "positive integer"),
    (["--experts"], "needs -m FILE"),
    (["--layers", "--attention"], "separate benchmarks"),
    (["--linear", "--layers"], "separate benchmarks"),
    (["--attention", "--paths", "magic"], "unknown attention path"),
    (["--alter-demo", "-m", "x.gguf"], "alternatives"),
    (["--layers", "--algorithms", "fft"], "unknown algorithm"),
    (["-m", "/nonexistent.gguf"], "no such file"),
    (["--plot", "chart.svg"], "give a .png path"),
    (["--tasks", "gen"], "goes with --peers"),
    (["--peers", "torch", "--tasks", "unet-b2,video"], "--tasks takes"),
    (["--peers", "torch", "--family", "sdxl", "--tasks", "gen"], "SD1.x and SD2.x"),
])
def test_bench_bad_arguments(args, message):
    res = CliRunner().invoke(main, ["bench", *args])
    assert res.exit_code == 1 and message in res.output, res.output


def test_report_puts_machines_side_by_side_with_their_own_ratios():
    from pysdcpp.bench_report import render

    def report(cpu, family, simd, up, acc, date):
        phases = lambda t: {"sampling": {"median": t}, "total": {"median": t + 1}}  # noqa: E731
        return {"kind": "model", "model": "/x/sd.gguf", "size": 256, "steps": 4, "guidance_scale": None, "repeat": 1,
                "baseline": "upstream", "threads": 2, "date": date,
                "variants": {"upstream": {}, "accelerated": {}},
                "machine": {"cpu": cpu, "cpu_family": family, "cpu_model": 1, "simd": simd, "logical_cores": 2,
                            "system": "Linux"},
                "summary": {"upstream": {"phases": phases(up), "speedup": {}, "peak_rss": 1 << 30, "runs": 1,
                                         "failed": [], "step": {"median": up / 4}},
                            "accelerated": {"phases": phases(acc), "speedup": {"sampling": up / acc,
                                                                               "total": (up + 1) / (acc + 1)},
                                            "peak_rss": 1 << 30, "runs": 1, "failed": [], "step": {"median": acc / 4}}}}

    text = render([report("AMD EPYC", 23, ["avx2"], 30.0, 10.0, "2026-11-01"),
                   report("AMD EPYC", 25, ["avx2", "avx512f"], 12.0, 8.0, "2026-12-01")])
    section = text.split("### Across machines")[1].split("###")[0]
    assert "family 23" in section and "family 25" in section
    row = next(line for line in section.splitlines() if line.startswith("| accelerated"))
    assert "sampling 3.00x" in row and "sampling 1.50x" in row  # each machine against its own upstream
    assert "baseline: sampling 30.0 s" in section and "baseline: sampling 12.0 s" in section
    # one machine only: no comparison section
    assert "Across machines" not in render([report("AMD EPYC", 23, ["avx2"], 30.0, 10.0, "2026-11-01")])
