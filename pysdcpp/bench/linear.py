"""The linear-layer benchmark (`pysdcpp bench --linear`): the linear layers of SD1.5's UNet, each path timed,
and its table."""

from __future__ import annotations

import statistics

import numpy as np

from ..format.families import CONTEXT_LENGTH, context_width
from .machine import build_info, footer, machine_info, utc_now


def sd15_linear_shapes(size: int) -> dict[tuple[int, int, int], list[str]]:
    """Distinct linear layers (rows, K, N) of SD1.5's UNet transformer blocks at `size` px, batch 1: per latent
    level the attention projections, the feed-forward pair (GEGLU: C -> 8C, 4C -> C) and the cross-attention keys
    and values over the 77-token context, with the layers that make them."""
    side = size // 8
    levels = [(320, side * side, "down_blocks.0 / up_blocks.3"), (640, (side // 2) ** 2, "down_blocks.1 / up_blocks.2"),
              (1280, (side // 4) ** 2, "down_blocks.2 / up_blocks.1"), (1280, (side // 8) ** 2, "mid_block")]
    shapes: dict[tuple[int, int, int], list[str]] = {}
    for c, tokens, where in levels:
        for (rows, k, n), what in (((tokens, c, c), "attn q/k/v/out"), ((tokens, c, 8 * c), "ff proj (GEGLU)"),
                                   ((tokens, 4 * c, c), "ff out"), ((CONTEXT_LENGTH, context_width("sd1"), c), "cross-attn k/v")):
            shapes.setdefault((rows, k, n), []).append(f"{where} {what}")
    return shapes


def linear_bench(size: int = 512, threads: int = 2, repeat: int = 5, paths: tuple[str, ...] = ("upstream", "fast"),
                 progress=None) -> dict:
    """Every distinct linear layer of SD1.5's UNet at `size` px, F16 weights, each path in this process,
    repetitions interleaved; steady-state times (second run of each call)."""
    from ..layers import linear

    rng = np.random.default_rng(0)
    shapes = sd15_linear_shapes(size)
    rows_out = []
    for i, ((rows, k, n), names) in enumerate(sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * kv[0][2])):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        secs: dict[str, list[float]] = {p: [] for p in paths}
        outputs = {}
        for _ in range(repeat):
            for p in paths:
                y, s = linear(x, w, b, path=p, threads=threads, repeat=2)
                secs[p].append(s[1])
                outputs[p] = y
        ref = x[:64].astype(np.float64) @ w.astype(np.float16).astype(np.float64).T + b
        med = {p: statistics.median(v) for p, v in secs.items()}
        row = {"rows": rows, "K": k, "N": n, "layers": names, "median_s": med, "seconds": secs,
               "speedup_vs_upstream": {p: med["upstream"] / med[p] for p in paths} if "upstream" in paths else {},
               "gflops": {p: 2 * rows * k * n / med[p] / 1e9 for p in paths},
               "max_error": {p: float(np.abs(o[:64] - ref).max() / np.abs(ref).max()) for p, o in outputs.items()}}
        rows_out.append(row)
        if progress:
            progress(i + 1, len(shapes), row)
    return {"kind": "linear", "size": size, "threads": threads, "repeat": repeat, "paths": list(paths),
            "date": utc_now(),
            "machine": machine_info(), "build": build_info(), "rows": rows_out}


def format_linear_table(report: dict) -> str:
    ps = report["paths"]
    head = f"{'rows x K -> N':>20} " + " ".join(f"{p + ' ms':>12}" for p in ps) + " " + \
        " ".join(f"{'x ' + p:>8}" for p in ps if p != "upstream") + " " + \
        " ".join(f"{p + ' GF/s':>11}" for p in ps) + f" {'max err':>8}  layers"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        shape = f"{r['rows']} x {r['K']} -> {r['N']}"
        cells = f"{shape:>20} "
        cells += " ".join(f"{r['median_s'][p] * 1e3:>12.2f}" for p in ps)
        if r["speedup_vs_upstream"]:
            cells += " " + " ".join(f"{r['speedup_vs_upstream'][p]:>8.2f}" for p in ps if p != "upstream")
        cells += " " + " ".join(f"{r['gflops'][p]:>11.1f}" for p in ps)
        cells += f" {max(r['max_error'].values()):>8.1e}  {'; '.join(r['layers'])}"
        lines.append(cells)
    lines.append(footer(report, f"median of {report['repeat']}, F16 weights"))
    return "\n".join(lines)
