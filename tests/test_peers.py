"""`pysdcpp bench --peers`: every runtime gets the same inputs and computes the same function; ours, upstream's
path and OpenVINO agree with PyTorch's output within the bounds the component tests hold (the benchmark's output
agreement column is measured, not assumed); bad runtime names fail before anything starts."""

from __future__ import annotations

import pytest

from conftest import diffusers_folder
from pysdcpp.bench.peers import RUNTIMES, format_peers_table, inputs, peers_bench

UNET_TOL = 2e-3   # test_components' bounds: one UNet evaluation, one VAE decode against diffusers
VAE_TOL = 1e-3


def test_inputs_and_bad_names():
    x = inputs("sd1", 128)
    assert x["latent"].shape == (2, 4, 16, 16) and x["context"].shape == (2, 77, 768)
    assert x["vae_latent"].shape == (1, 4, 16, 16)
    with pytest.raises(ValueError, match="unknown runtime 'tensorflow'"):
        peers_bench("m.gguf", "folder", ["pysdcpp", "tensorflow"])
    with pytest.raises(ValueError, match="multiple of 64"):
        peers_bench("m.gguf", "folder", ["pysdcpp"], size=100)
    with pytest.raises(ValueError, match="tasks are"):
        peers_bench("m.gguf", "folder", ["pysdcpp"], tasks=("unet-b3",))
    assert {"pysdcpp", "upstream", "torch", "openvino"} <= set(RUNTIMES)


@pytest.mark.slow
def test_peers_agree_with_pytorch(sd15_f16, module_tmp):
    folder = diffusers_folder("sd1", module_tmp)
    # Batch 2 and upstream's path (bit-identical to upstream, test_generate) stay out: they add time, not cover.
    report = peers_bench(str(sd15_f16), str(folder), ["pysdcpp", "torch", "openvino"], size=128, threads=2,
                         repeat=1, tasks=("unet-b1", "vae"))
    s = report["summary"]
    assert not any(e["error"] for e in s.values()), {k: e["error"] for k, e in s.items()}
    for rt in ("pysdcpp", "openvino"):
        assert s[rt]["unet-b1"]["rel_l2_vs_torch"] <= UNET_TOL, (rt, s[rt]["unet-b1"])
        assert s[rt]["vae"]["rel_l2_vs_torch"] <= VAE_TOL, (rt, s[rt]["vae"])
        assert s[rt]["peak_rss"] > 500 << 20
    assert all(s[rt][t]["median"] > 0 for rt in s for t in report["tasks"])
    # each peer timed in its own phase, in turn with pysdcpp: its ratio is over pysdcpp's times of that phase
    for rt in ("torch", "openvino"):
        for t in report["tasks"]:
            e = s[rt][t]
            assert e["vs_pysdcpp"] == pytest.approx(e["median"] / e["pysdcpp_median_same_phase"])
    assert s["pysdcpp"]["unet-b1"]["runs"] == 2   # one per phase
    table = format_peers_table(report)
    assert all(rt in table for rt in s)
    from pysdcpp.bench_report import render

    assert "### Peer runtimes, 128 px" in render([report])


def test_a_runtime_that_cannot_start_is_reported_and_the_others_run(tmp_path):
    # pysdcpp-q8_0 without its q8_0 file, and a torch peer on a folder that is not there: each fails in its own
    # worker at setup; the report names why and carries no times for them.
    report = peers_bench(str(tmp_path / "m.gguf"), str(tmp_path / "folder"), ["pysdcpp-q8_0", "torch"], size=64,
                         repeat=1, tasks=("vae",), timeout=120)
    s = report["summary"]
    assert "q8_0 GGUF" in s["pysdcpp-q8_0"]["error"] and "vae" not in s["pysdcpp-q8_0"]
    assert s["torch"]["error"] and "vae" not in s["torch"]
    assert "FAILED" in format_peers_table(report)
