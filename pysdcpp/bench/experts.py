"""The ALTER expert benchmark (`pysdcpp bench --experts`): one UNet evaluation per expert against the dense
model, and its table."""

from __future__ import annotations

import statistics

import numpy as np

from ..format.families import CONTEXT_LENGTH, context_width
from ..format.macs import unet_macs
from .machine import build_info, footer, machine_info, utc_now


def expert_bench(model: str, size: int = 512, threads: int = 2, repeat: int = 3, progress=None) -> dict:
    """One UNet evaluation per ALTER expert (at a timestep it serves) against the dense model at the same
    timestep, in this process (two contexts, interleaved repetitions, a warm-up call each first)."""
    import time

    from .. import StableDiffusion

    if size <= 0 or size % 64:
        raise ValueError(f"size must be a positive multiple of 64, got {size}")
    with StableDiffusion(model, threads=threads, alter=True) as routed, \
            StableDiffusion(model, threads=threads, alter=False) as dense:
        routing = routed.alter.routing
        family = routed.model_file.family
        macs = unet_macs(family, size // 8, size // 8)
        per_expert = macs.experts(routing)
        rng = np.random.default_rng(0)
        latent = rng.standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
        context = rng.standard_normal((1, CONTEXT_LENGTH, context_width(family))).astype(np.float32)
        rows = []
        used = sorted(set(int(e) for e in routing.table))
        for i, e in enumerate(used):
            lo, hi = routing.timestep_ranges(e)[0]
            t = float((lo + hi) // 2)
            times = {"expert": [], "dense": []}
            for sd in (routed, dense):
                sd.unet(latent, t, context)  # warm-up: one-off filter transforms, allocations
            for _ in range(repeat):
                for key, sd in (("expert", routed), ("dense", dense)):
                    t0 = time.perf_counter()
                    sd.unet(latent, t, context)
                    times[key].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"expert": e, "timestep": t, "timesteps": routing.timestep_ranges(e),
                         "skipped": [u for u, k in zip(routing.units, routing.masks[e]) if not k],
                         "macs": per_expert[e], "dense_macs": macs.dense, "median_s": med, "seconds": times,
                         "speedup_vs_dense": med["dense"] / med["expert"]})
            if progress:
                progress(i + 1, len(used), rows[-1])
    return {"kind": "experts", "model": str(model), "size": size, "threads": threads, "repeat": repeat,
            "date": utc_now(),
            "machine": machine_info(), "build": build_info(), "rows": rows}


def format_expert_table(report: dict) -> str:
    head = f"{'expert':>6} {'timesteps':>22} {'skipped':>8} {'MACs':>7} {'expert ms':>10} {'dense ms':>10} " \
        f"{'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        ranges = ",".join(f"{a}-{b}" for a, b in r["timesteps"])
        lines.append(f"{r['expert']:>6} {ranges[:22]:>22} {len(r['skipped']):>8} "
                     f"{100 * r['macs'] / r['dense_macs']:>6.1f}% {r['median_s']['expert'] * 1e3:>10.0f} "
                     f"{r['median_s']['dense'] * 1e3:>10.0f} {r['speedup_vs_dense']:>7.2f}x")
    lines.append(footer(report, f"one UNet evaluation (batch 1), median of {report['repeat']}"))
    return "\n".join(lines)
