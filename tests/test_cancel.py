"""Stopping a generation: an exception from the step callback (StopGeneration, or any other) stops the accelerated
library before its next step and comes out of generate() with no image; the next generation in the same context
is the image a fresh one makes; the memory a cancelled run took is given back; Ctrl-C on `pysdcpp generate` exits
130 at the next step and writes nothing. The upstream library has no cancel hook: it finishes the run, then the
exception comes out the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import rss_mb as _rss_mb

from pysdcpp import StableDiffusion, StopGeneration

pytestmark = pytest.mark.slow

# Where a run stops depends on neither the size nor guidance: 64 px, one UNet evaluation per step (on the same
# batch-1 compute buffer guided steps use twice).
SETTINGS = dict(prompt="a lighthouse at dusk", width=64, height=64, num_inference_steps=8, guidance_scale=1.0,
                sampler="euler", seed=99)
# The memory test at 128 px: a leaked UNet compute buffer (about 100 MB there) shows many times over its bound.
MEMORY_SETTINGS = dict(SETTINGS, width=128, height=128, num_inference_steps=4)


def _stop_at(step_to_stop: int, seen: list, exc: BaseException):
    def callback(step, steps, seconds):
        if step == 0:   # the library reports step 0 as sampling starts
            return
        seen.append(step)
        if step == step_to_stop:
            raise exc
    return callback


@pytest.fixture(scope="module")
def reference(sd15_f16):
    with StableDiffusion(sd15_f16, threads=2) as sd:
        return np.asarray(sd.generate(**SETTINGS)[0])


def test_accelerated_stops_before_the_next_step_and_recovers(sd15_f16, reference):
    with StableDiffusion(sd15_f16, threads=2) as sd:
        seen = []
        with pytest.raises(StopGeneration):
            sd.generate(callback=_stop_at(2, seen, StopGeneration()), **SETTINGS)
        assert seen == [1, 2]   # step 3 never ran
        seen = []
        with pytest.raises(ZeroDivisionError):   # any exception stops the run and comes out as itself
            sd.generate(callback=_stop_at(5, seen, ZeroDivisionError("boom")), **SETTINGS)
        assert seen == [1, 2, 3, 4, 5]
        np.testing.assert_array_equal(np.asarray(sd.generate(**SETTINGS)[0]), reference)
        # a stop asked for at the last step skips the VAE decode, and still no image
        seen = []
        with pytest.raises(StopGeneration):
            sd.generate(callback=_stop_at(8, seen, StopGeneration()), **SETTINGS)
        np.testing.assert_array_equal(np.asarray(sd.generate(**SETTINGS)[0]), reference)


def test_cancelled_runs_give_their_memory_back(sd15_f16):
    """RSS after two full generations, then after 6 runs cancelled at different steps: the soak test's measure.
    A cancelled run frees its compute buffers and Winograd filters the way a failed compute does; a leak of the
    UNet's compute buffer (about 100 MB at 128 px) or the filters (hundreds of MB) per run would show many times
    over the 30 MB bound."""
    with StableDiffusion(sd15_f16, threads=2) as sd:
        sd.generate(**MEMORY_SETTINGS)
        sd.generate(**MEMORY_SETTINGS)
        base = _rss_mb()
        for k in range(6):
            with pytest.raises(StopGeneration):
                sd.generate(callback=_stop_at(1 + k % 3, [], StopGeneration()), **MEMORY_SETTINGS)
        after = _rss_mb()
        sd.generate(**MEMORY_SETTINGS)
        print(f"RSS after full runs {base:.1f} MB, after 6 cancelled runs {after:.1f} MB, after one more full run "
              f"{_rss_mb():.1f} MB")
        assert after - base < 30


def test_upstream_finishes_the_run_then_raises(sd15_f16):
    with StableDiffusion(sd15_f16, backend="upstream", threads=2) as sd:
        seen = []
        with pytest.raises(StopGeneration):
            sd.generate(callback=_stop_at(2, seen, StopGeneration()), **SETTINGS)
        assert seen == list(range(1, 9))


def test_ctrl_c_exits_130_and_writes_nothing(sd15_f16, tmp_path):
    out = tmp_path / "out.png"
    cmd = [sys.executable, "-c", "import sys; from pysdcpp.cli import main; sys.exit(main())", "generate",
           str(sd15_f16), "-p", "a lighthouse", "-W", "128", "-H", "128", "--steps", "40",
           "--sampler", "euler", "-t", "2", "-o", str(out), "-v"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "generating image" in line:
                break
        time.sleep(1.0)   # a step or two in
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    text = "".join(lines) + err
    assert proc.returncode == 130, text[-3000:]
    assert "cancelled" in text
    assert not out.exists() and not list(tmp_path.iterdir())   # no image, no partial file
    import re

    stopped = [int(m) for m in re.findall(r"generation cancelled before step (\d+)", text)]
    assert stopped and stopped[0] < 40
