"""Long runs: one context generating 100 times without its memory growing, and two contexts used from two threads at
once giving exactly the images they give one after the other."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import rss_mb as _rss_mb

from pysdcpp import StableDiffusion

pytestmark = pytest.mark.slow


def _malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out: exact where RSS moves in pages; None off glibc."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        fn = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return None
    fn.restype = MallInfo2
    m = fn()
    return m.uordblks + m.hblkhd


def test_soak_100_generations_rss_flat(sd15_f16):
    """100 generations (64 px, 1 step) in one context; resident memory sampled after each.

    Measured on the 2-core test machine (synthetic SD1.5 F16, 2 threads): in a bare script 2046.0 MB after loading,
    2050.5 MB after the first generation and exactly that after each of the other 99; in this test (pytest, torch
    imported) 2074.9 MB after the first and after the 100th, never more (growth 10 -> 100: 0.0 MB, fitted slope
    0.000 MB per generation); 0.66-0.9 s per generation on an idle machine (2-4 s, up to 19 s, while another test
    run shared the two cores), about 70 s for the test. A leak of a few MB per generation would add a few hundred MB
    over generations 10..100: the bounds below (growth under 2% of the RSS at generation 10, about 41 MB; slope under
    0.5 MB per generation) catch anything from about half a MB per generation up, with a wide margin over the
    measured (zero) drift.
    """
    rss = []
    seconds = []
    heap = None
    with StableDiffusion(sd15_f16, threads=2) as sd:
        for i in range(100):
            if i == 10:
                heap = _malloc_in_use()
            t0 = time.perf_counter()
            images = sd.generate("x", width=64, height=64, num_inference_steps=1, seed=i)
            seconds.append(time.perf_counter() - t0)
            assert len(images) == 1 and images[0].size == (64, 64)
            rss.append(_rss_mb())
        heap_growth = None if heap is None else _malloc_in_use() - heap
    at10, at100 = rss[9], rss[99]
    slope = float(np.polyfit(np.arange(10, 101), rss[9:], 1)[0])
    summary = (f"RSS {rss[0]:.1f} MB after generation 1, {at10:.1f} at 10, {at100:.1f} at 100 (max {max(rss):.1f}); "
               f"slope {slope:.3f} MB/generation over 10..100; {np.median(seconds):.2f} s per generation")
    print(summary)
    assert at100 - at10 < 0.02 * at10, summary
    assert slope < 0.5, summary
    if heap_growth is not None:
        # malloc'd bytes are exact where RSS moves in pages: one leaked 64x64 RGB image is 12 KB, 90 of them 1.1 MB.
        assert heap_growth < 64 * 1024, f"malloc'd bytes grew by {heap_growth / 1024:.0f} KB over generations 10..100"


def test_two_contexts_in_two_threads(sd15_f16):
    """Two contexts, each made and used in its own thread (2 generations each, different seeds), at the same time:
    no crash, and each thread gets bit-identical images to the same calls made one after the other in one thread.

    How that holds (pysdcpp/_native.py, pysdcpp/api.py): both contexts share the one loaded `NativeLibrary` of their
    backend, and every native call (new_sd_ctx, generate_image, free_sd_ctx, the component calls) runs under its
    `lock` (a re-entrant lock), because the library's log/progress callbacks and the kernel settings (conv, attention,
    linear, Winograd cache budget, ALTER routing) are process-wide, not per context. So calls from the two threads
    never run at once: one generation waits for the other, and each sets its own kernel choices and progress callback
    (`set_progress`) inside the lock just before computing, clearing the callback after. Two threads thus give
    no speed-up, but no interference either: each `callback` here sees only its own generation's steps, in its own
    thread.
    """
    prompt = "a lighthouse at dusk"
    seeds = {"a": (101, 102), "b": (201, 202)}

    def run(sd: StableDiffusion, ss, steps_seen: list | None = None) -> list[np.ndarray]:
        def callback(step, steps, _seconds):
            if steps_seen is not None:
                steps_seen.append((threading.get_ident(), step, steps))
        return [np.asarray(sd.generate(prompt, width=64, height=64, num_inference_steps=1, seed=s,
                                       callback=callback)[0]) for s in ss]

    with StableDiffusion(sd15_f16, threads=2) as sd:
        sequential = {k: run(sd, ss) for k, ss in seeds.items()}

    results: dict[str, list[np.ndarray]] = {}
    steps_seen: dict[str, list] = {k: [] for k in seeds}
    idents: dict[str, int] = {}
    errors: list[BaseException] = []
    natives = {}
    ready = threading.Barrier(len(seeds), timeout=600)

    def worker(key: str) -> None:
        try:
            idents[key] = threading.get_ident()
            with StableDiffusion(sd15_f16, threads=2) as sd:
                natives[key] = sd.native
                ready.wait()   # both contexts loaded: generate at the same time
                results[key] = run(sd, seeds[key], steps_seen[key])
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
            ready.abort()

    threads = [threading.Thread(target=worker, args=(k,), name=f"sd-{k}") for k in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1200)
    assert not any(t.is_alive() for t in threads), "a generation thread hung"
    assert not errors, errors
    assert natives["a"] is natives["b"]   # one library, one lock: the native calls are serialised
    for key in seeds:
        assert len(results[key]) == 2
        for got, want in zip(results[key], sequential[key]):
            assert got.dtype == want.dtype and got.shape == want.shape == (64, 64, 3)
            assert np.array_equal(got, want), f"thread {key}: images differ from the sequential run"
        # each generation's progress (the library reports step 0, then 1 of 1) reached its own callback only, in
        # its own thread
        seen = steps_seen[key]
        assert {ident for ident, _, _ in seen} == {idents[key]}, seen
        assert all(steps == 1 for _, _, steps in seen) and [s for _, s, _ in seen if s == 1] == [1, 1], seen
    assert not np.array_equal(results["a"][0], results["b"][0])   # different seeds, different images
