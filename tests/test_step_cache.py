"""Upstream's step-level caches (ucache, spectrum) through `generate(step_cache=...)`: the image sd-cli makes with
the same --cache-mode/--cache-option, bit for bit, the skipped-step count sd-cli's own log prints, the same image
from the accelerated library with its accelerations off, and the canonical spec in the PNG parameters."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from pysdcpp import StableDiffusion, _native
from pysdcpp.api import GenerationParams, png_parameters
from pysdcpp.step_cache import parse_step_cache

SETTINGS = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", width=128, height=128,
                num_inference_steps=8, guidance_scale=7.0, sampler="euler", seed=4321)
# spec: (sd-cli --cache-mode, --cache-option); thresholds under which the random-weight fixture skips steps
CACHES = {"ucache:threshold=3,start=0.1": ("ucache", "threshold=3,start=0.1"),
          "spectrum:warmup=2": ("spectrum", "warmup=2")}
_SKIP_LOG = re.compile(r"(?:UCache|Spectrum) skipped (\d+)/(\d+) steps")


def test_spec_is_canonical():
    assert parse_step_cache("ucache").spec() == "ucache"
    assert parse_step_cache(" ucache:start=0.1,threshold=3 ").spec() == "ucache:threshold=3,start=0.1"
    assert parse_step_cache("spectrum:m=4,w=0.5").spec() == "spectrum:w=0.5,m=4"
    text = png_parameters(GenerationParams("x", step_cache="ucache:threshold=3,start=0.1"), "m", "upstream", "0")
    assert 'Step cache: "ucache:threshold=3,start=0.1"' in text


def test_apply_writes_the_fields_sd_cli_writes():
    lib = _native.load("upstream")  # the process-wide instance: a second one would take over the log callback
    g = lib.ffi.new("sd_img_gen_params_t*")
    lib.lib.sd_img_gen_params_init(g)
    parse_step_cache("ucache:threshold=2.5,start=0.2,end=0.9,decay=0.5,relative=0,reset=0").apply(lib.lib, g.cache)
    c = g.cache
    assert c.mode == lib.lib.SD_CACHE_UCACHE
    assert (c.reuse_threshold, c.start_percent, c.end_percent, c.error_decay_rate) == pytest.approx(
        (2.5, 0.2, 0.9, 0.5))
    assert not c.use_relative_threshold and not c.reset_error_on_compute
    parse_step_cache("spectrum:w=0.3,m=4,lam=2,window=3,flex=0.25,warmup=1,stop=0.8").apply(lib.lib, g.cache)
    assert c.mode == lib.lib.SD_CACHE_SPECTRUM
    assert (c.spectrum_w, c.spectrum_lam, c.spectrum_flex_window, c.spectrum_stop_percent) == pytest.approx(
        (0.3, 2.0, 0.25, 0.8))
    assert (c.spectrum_m, c.spectrum_window_size, c.spectrum_warmup_steps) == (4, 3, 1)


@pytest.fixture(scope="module")
def runs(sd15_f16):
    out = {}
    for backend in ("upstream", "accelerated"):
        with StableDiffusion(sd15_f16, backend=backend, threads=2, conv="im2col", attention="upstream",
                             linear="upstream", batch_guidance=False) as sd:
            out[backend, None] = sd.generate_with_info(**SETTINGS)
            for spec in CACHES:
                out[backend, spec] = sd.generate_with_info(step_cache=spec, **SETTINGS)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("spec", CACHES)
def test_same_image_and_skips_as_sd_cli(runs, spec, sd15_f16, tmp_path):
    cli = _native.upstream_cli()
    if cli is None:
        pytest.skip("upstream sd-cli was not built (PYSDCPP_BUILD_CLI=OFF)")
    mode, option = CACHES[spec]
    out = tmp_path / "cli.png"
    cmd = [str(cli), "-m", str(sd15_f16), "-p", SETTINGS["prompt"], "-n", SETTINGS["negative_prompt"],
           "-W", "128", "-H", "128", "--steps", "8", "--cfg-scale", "7.0", "--sampling-method", "euler",
           "--seed", "4321", "-t", "2", "--cache-mode", mode, "--cache-option", option, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = _SKIP_LOG.findall(proc.stdout + proc.stderr)
    assert found, "sd-cli printed no skipped-step count"
    skipped, total = map(int, found[-1])
    ours = runs["upstream", spec]
    assert (ours.step_cache_skipped, total) == (skipped, 8)
    assert skipped > 0  # the test would not see a cache that never skips
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(ours.images[0]))
    # a skipped step is a step without a UNet evaluation: the image is not the uncached one
    assert not np.array_equal(np.asarray(ours.images[0]), np.asarray(runs["upstream", None].images[0]))


@pytest.mark.slow
@pytest.mark.parametrize("spec", CACHES)
def test_accelerated_library_runs_upstreams_cache(runs, spec):
    up, acc = runs["upstream", spec], runs["accelerated", spec]
    assert acc.step_cache_skipped == up.step_cache_skipped
    assert acc.params.step_cache == spec
    np.testing.assert_array_equal(np.asarray(acc.images[0]), np.asarray(up.images[0]))
    assert runs["accelerated", None].step_cache_skipped is None
