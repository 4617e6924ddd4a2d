"""Whole generations (`pysdcpp bench`): the variants, each run in its own worker process, the statistics
over the runs, and the model table."""

from __future__ import annotations

import re
import statistics

import numpy as np

from .machine import build_info, footer, machine_info, peak_rss, utc_now


# A variant is a name for StableDiffusion keyword arguments (and the generation's `inheritance` or `step_cache`):
# new accelerations plug in here.
# the accelerated library with every acceleration off: upstream's paths, bit for bit
UPSTREAM_PATHS = {"conv": "im2col", "attention": "upstream", "linear": "upstream", "batch_guidance": False}
VARIANTS: dict[str, dict] = {
    "upstream": {"backend": "upstream", "conv": "im2col"},
    "accelerated": {"backend": "accelerated"},  # the accelerated library's defaults (all accelerations on)
    # all off: upstream's paths
    "im2col": {"backend": "accelerated", **UPSTREAM_PATHS},
    "direct": {"backend": "accelerated", **UPSTREAM_PATHS, "conv": "direct"},
    # one acceleration at a time
    "winograd": {"backend": "accelerated", **UPSTREAM_PATHS, "conv": "winograd"},
    "fast-attention": {"backend": "accelerated", **UPSTREAM_PATHS, "attention": "fast"},
    "fast-linear": {"backend": "accelerated", **UPSTREAM_PATHS, "linear": "fast"},
    "batched-guidance": {"backend": "accelerated", **UPSTREAM_PATHS, "batch_guidance": True},
    "separate-guidance": {"backend": "accelerated", "batch_guidance": False},   # every acceleration but that one
    "upstream-direct": {"backend": "upstream", "conv": "direct"},
    "dense": {"backend": "accelerated", "alter": False},  # an ALTER file's dense model, accelerated
    # feature inheritance (docs/inheritance.md): `inheritance` is the generation's policy, as --inherit writes it
    "deepcache": {"backend": "accelerated", "inheritance": "deepcache:interval=3,branch=0"},
    "deepcache-b1": {"backend": "accelerated", "inheritance": "deepcache:interval=3,branch=1"},
    "deepcache-5": {"backend": "accelerated", "inheritance": "deepcache:interval=5,branch=0"},
    "units": {"backend": "accelerated", "inheritance": "units"},
    # upstream's step-level caches (pysdcpp.step_cache), on our kernels: a skipped step reuses the whole UNet output
    "ucache": {"backend": "accelerated", "step_cache": "ucache"},
    "ucache-t4": {"backend": "accelerated", "step_cache": "ucache:threshold=4"},
    "spectrum": {"backend": "accelerated", "step_cache": "spectrum"},
    "upstream-ucache": {"backend": "upstream", "conv": "im2col", "step_cache": "ucache"},
    # our GEMM's register tiles (pysdcpp.layers.gemm_tile; the default is wide on AVX-512 builds, else narrow)
    "narrow-gemm": {"backend": "accelerated", "gemm_tile": "narrow"},
    "wide-gemm": {"backend": "accelerated", "gemm_tile": "wide"},
}


def parse_variant(spec: str) -> tuple[str, dict, int | None]:
    """`name` or `name@STEPS` (a per-variant step count, e.g. `upstream@50` against a 20-step ALTER run):
    (label, StableDiffusion keyword arguments, steps or None)."""
    name, _, steps = spec.partition("@")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)} (optionally name@STEPS)")
    if steps:
        if not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"variant {spec!r}: the step count after @ must be a positive integer")
        return spec, VARIANTS[name], int(steps)
    return spec, VARIANTS[name], None


# Phase durations the native library logs (INFO), identical in both libraries.
# "ggml_extend.hpp:1940 - unet compute buffer size: 559.43 MB(RAM)" (DEBUG): the graph's working memory, per runner.
_BUFFER_LOG = re.compile(r"(\S+) compute buffer size: ([0-9.]+) MB")

_PHASE_LOGS = {
    "text_encoding": re.compile(r"get_learned_condition completed, taking ([0-9.]+)s"),
    "sampling": re.compile(r"sampling completed, taking ([0-9.]+)s"),
    "vae_decode": re.compile(r"decode_first_stage completed, taking ([0-9.]+)s"),
    "generate": re.compile(r"generate_image completed in ([0-9.]+)s"),
}


def _worker(variant: dict, model: str, params: dict, threads: int, queue) -> None:
    """One model load + one generation in a fresh process; reports phases, steps, peak RSS and the image."""
    import logging
    import time

    try:
        from .. import StableDiffusion

        lines: list[str] = []

        class Capture(logging.Handler):
            def emit(self, record):
                lines.append(record.getMessage())

        logger = logging.getLogger("pysdcpp.native")
        logger.setLevel(logging.DEBUG)  # the compute-buffer sizes are debug lines
        logger.addHandler(Capture())
        stamps: list[float] = []
        variant = dict(variant)
        if "inheritance" in variant:
            from ..inheritance import parse_inheritance

            params = dict(params, inheritance=parse_inheritance(variant.pop("inheritance")))
        if "step_cache" in variant:
            params = dict(params, step_cache=variant.pop("step_cache"))
        if "gemm_tile" in variant:   # process-wide; this worker's process runs this variant alone
            from ..layers import set_gemm_tile

            set_gemm_tile(variant.pop("gemm_tile"))
        t0 = time.perf_counter()
        with StableDiffusion(model, threads=threads, **variant) as sd:
            load = time.perf_counter() - t0
            t1 = time.perf_counter()
            result = sd.generate_with_info(callback=lambda *a: stamps.append(time.perf_counter()), **params)
            wall = time.perf_counter() - t1
        phases = {"model_load": load, "total": load + wall}
        for name, rx in _PHASE_LOGS.items():
            found = [float(m.group(1)) for line in lines if (m := rx.search(line))]
            if found:
                phases[name] = found[-1]
        # The callback fires once before the first step (step 0), then after each step.
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        hwm = peak_rss()
        buffers: dict[str, float] = {}
        for line in lines:
            if m := _BUFFER_LOG.search(line):
                buffers[m.group(1)] = max(buffers.get(m.group(1), 0.0), float(m.group(2)))
        alter = [s.as_dict() for s in result.alter_steps]
        inherited = [e.as_dict() for e in result.inherited]
        cache = None
        if result.step_cache_skipped is not None:
            cache = {"spec": result.params.step_cache, "skipped_steps": result.step_cache_skipped,
                     "steps": result.params.num_inference_steps}
        queue.put({"ok": True, "phases": phases, "steps": steps, "peak_rss": hwm, "compute_buffers_mb": buffers,
                   "alter_steps": alter, "inherited": inherited, "step_cache": cache,
                   "image": np.asarray(result.images[0]).copy()})
    except BaseException as e:  # reported, never raised: the other variants go on
        queue.put({"ok": False, "error": f"{type(e).__name__}: {e}"})


def run_variant(variant: dict, model: str, params: dict, threads: int, timeout: float) -> dict:
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(variant, model, params, threads, q), daemon=True)
    p.start()
    try:
        out = q.get(timeout=timeout)
    except queue_mod.Empty:
        p.kill()
        p.join()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    p.join(timeout=30)
    if p.exitcode not in (0, None):
        out.setdefault("warning", f"worker exit code {p.exitcode}")
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def summarize(runs: dict[str, list[dict]], baseline: str = "upstream") -> dict:
    """Medians and ranges per phase, pairwise speedups against `baseline` (repetition by repetition)."""
    out = {}
    base_runs = runs.get(baseline, [])
    for name, rs in runs.items():
        ok = [r for r in rs if r.get("ok")]
        entry = {"runs": len(rs), "failed": [r["error"] for r in rs if not r.get("ok")]}
        if ok:
            phases = sorted({k for r in ok for k in r["phases"]})
            entry["phases"] = {ph: {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                               for ph in phases if (vals := [r["phases"][ph] for r in ok if ph in r["phases"]])}
            steps = [s for r in ok for s in r["steps"]]
            if steps:
                entry["step"] = {"median": statistics.median(steps), "min": min(steps), "max": max(steps)}
            # Steps after each generation's first: the steady state, once the first step's one-off work (the
            # hoisted filter transforms, buffer allocation) is done; what one more UNet evaluation costs.
            later = [s for r in ok for s in r["steps"][1:]]
            if later:
                entry["later_step"] = {"median": statistics.median(later), "min": min(later), "max": max(later)}
            entry["peak_rss"] = max(r["peak_rss"] for r in ok)
            entry["compute_buffers_mb"] = ok[0].get("compute_buffers_mb", {})
            if ok[0].get("alter_steps"):
                st = ok[0]["alter_steps"]
                entry["alter"] = {"experts": [s["expert"] for s in st],
                                  "fraction_of_dense_macs": sum(s["macs"] for s in st) / sum(s["dense_macs"] for s in st)}
            if ok[0].get("inherited"):
                ev = ok[0]["inherited"]
                entry["inheritance"] = {
                    "inherited_evaluations": sum(1 for e in ev if e["inherited"]), "evaluations": len(ev),
                    "fraction_of_dense_macs": sum(e["macs"] for e in ev) / sum(e["dense_macs"] for e in ev)}
            if ok[0].get("step_cache"):
                c = ok[0]["step_cache"]
                # A skipped step runs no UNet evaluation; the others run the whole UNet (ALTER's share aside).
                entry["step_cache"] = dict(c, fraction_of_dense_macs=(c["steps"] - c["skipped_steps"]) / c["steps"])
            pairs = [(b, r) for b, r in zip(base_runs, rs) if b.get("ok") and r.get("ok")]
            entry["speedup"] = {ph: statistics.median(b["phases"][ph] / r["phases"][ph] for b, r in pairs
                                                      if r["phases"].get(ph, 0) > 0 and ph in b["phases"])
                                for ph in entry["phases"]
                                if any(r["phases"].get(ph, 0) > 0 and ph in b["phases"] for b, r in pairs)}
            if base_runs and base_runs[0].get("ok"):
                ref = base_runs[0]["image"]
                img = ok[0]["image"]
                entry["psnr_vs_" + baseline] = psnr(img, ref)
                entry["max_abs_diff_vs_" + baseline] = int(np.abs(img.astype(int) - ref.astype(int)).max())
        out[name] = entry
    return out


def model_bench(model: str, variants: list[str], size: int = 256, steps: int = 4, threads: int = 2,
                repeat: int = 2, timeout: float = 1800.0, progress=None, prompt: str = "a lighthouse at dusk",
                seed: int = 42, guidance_scale: float | None = None) -> dict:
    """Whole generations per variant; guidance_scale None: the model's default (7, few-step models 1)."""
    parsed = {label: (kwargs, st) for label, kwargs, st in map(parse_variant, variants)}
    if size <= 0 or size % 64:
        raise ValueError(f"size must be a positive multiple of 64, got {size}")
    if repeat < 1 or steps < 1 or threads < 1:
        raise ValueError("repeat, steps and threads must be at least 1")
    params = {"prompt": prompt, "width": size, "height": size, "num_inference_steps": steps, "seed": seed}
    if guidance_scale is not None:
        params["guidance_scale"] = float(guidance_scale)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(repeat):
        for v in variants:  # interleaved: A B A B ...
            kwargs, own_steps = parsed[v]
            p = dict(params, num_inference_steps=own_steps) if own_steps else params
            r = run_variant(kwargs, str(model), p, threads, timeout)
            runs[v].append(r)
            if progress:
                progress(rep, v, r)
    summary = summarize(runs, variants[0])
    return {"kind": "model", "model": str(model), "size": size, "steps": steps, "threads": threads,
            "guidance_scale": guidance_scale,
            "repeat": repeat, "baseline": variants[0],
            "variants": {v: dict(parsed[v][0], **({"steps": parsed[v][1]} if parsed[v][1] else {})) for v in variants},
            "date": utc_now(),
            "machine": machine_info(), "build": build_info(), "summary": summary,
            "runs": {v: [{k: val for k, val in r.items() if k != "image"} for r in rs] for v, rs in runs.items()}}


def format_model_table(report: dict) -> str:
    phases = ["model_load", "text_encoding", "sampling", "vae_decode", "total"]
    w = max(14, *(len(n) + 1 for n in report["summary"]))
    head = f"{'variant':<{w}}" + "".join(f"{p:>15}" for p in phases) + \
        f"{'step':>9}{'later':>9}{'peak RSS':>10}{'UNet buf':>10}{'MACs':>6}{'PSNR':>8}"
    lines = [head, "-" * len(head)]
    base = report["baseline"]
    for name, e in report["summary"].items():
        if "phases" not in e:
            lines.append(f"{name:<{w}} FAILED: {'; '.join(e['failed'])}")
            continue
        row = f"{name:<{w}}"
        for p in phases:
            ph = e["phases"].get(p)
            sp = e["speedup"].get(p)
            row += f"{ph['median']:>8.2f}s" + (f" x{sp:<4.2f}" if sp and name != base else " " * 6) if ph else " " * 15
        row += f"{e.get('step', {}).get('median', float('nan')):>8.2f}s"
        row += f"{e.get('later_step', {}).get('median', float('nan')):>8.2f}s{e['peak_rss'] / 2**20:>8.0f}MB"
        buf = e.get("compute_buffers_mb", {}).get("unet")
        row += f"{buf:>8.0f}MB" if buf else f"{'-':>10}"
        frac = e.get("inheritance", e.get("step_cache", e.get("alter", {}))).get("fraction_of_dense_macs")
        row += f"{100 * frac:>5.0f}%" if frac is not None else f"{'-':>6}"
        p_ = e.get("psnr_vs_" + base)
        row += f"{p_:>8.1f}" if p_ is not None and p_ != float("inf") else f"{'same':>8}"
        if e["failed"]:
            row += f"  ({len(e['failed'])} failed: {e['failed'][0]})"
        lines.append(row)
    lines.append(footer(report, f"{report['steps']} steps, median of {report['repeat']} (x: speedup vs {base}; "
                                 "UNet buf: its graph's compute buffer; MACs: the share of the dense UNet's that ALTER, "
                                 "inheritance or a step cache spent)"))
    return "\n".join(lines)
