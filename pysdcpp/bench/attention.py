"""The attention benchmark (`pysdcpp bench --attention`): the attention shapes of a family's UNet and the VAE
(SD1.x and SD2.x by default, SDXL with --family), each variant timed, and its table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from ..format.families import CONTEXT_LENGTH, UNET_CONFIGS, VAE_CONFIG
from ..format.unet import attention_heads, unet_blocks
from .machine import build_info, footer, machine_info, utc_now


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: L_q queries against L_k keys, `heads` heads of size d, batch N."""

    Lq: int
    Lk: int
    heads: int
    d: int
    N: int = 1

    @property
    def flops(self) -> int:  # the two products, Q K^T and P V
        return 4 * self.N * self.heads * self.Lq * self.Lk * self.d


def sd_attention_shapes(family: str, size: int) -> dict[AttentionShape, list[str]]:
    """Distinct attention calls of a family's UNet (self- and cross-attention per level with attention) and the VAE
    mid-block at `size` px, with the layers that make them; heads as stable-diffusion.cpp reads the config (SD1.x
    8 heads of C/8, SD2.x and SDXL heads of 64)."""
    latent = size // 8
    context = CONTEXT_LENGTH
    shapes: dict[AttentionShape, list[str]] = {}
    seen = set()
    for b in unet_blocks(family):
        if b.kind != "attention" or b.level in seen:
            continue
        seen.add(b.level)
        heads, d = attention_heads(UNET_CONFIGS[family], b.level)
        tokens = (latent >> b.level) ** 2
        for attn, lk in (("attn1", tokens), ("attn2", context)):
            shapes.setdefault(AttentionShape(tokens, lk, heads, d), []).append(f"unet level {b.level} {attn}")
    tokens = latent ** 2
    vae_c = VAE_CONFIG["block_out_channels"][-1]
    shapes.setdefault(AttentionShape(tokens, tokens, 1, vae_c), []).append("vae mid_block attention")
    return shapes


def attention_bench(families: tuple[str, ...] = ("sd1", "sd2"), sizes: tuple[int, ...] = (512, 768),
                    threads: int = 2, repeat: int = 3, variants: tuple[str, ...] = ("upstream", "gemm", "fused"),
                    progress=None) -> dict:
    """Every distinct attention shape of the given families and sizes, each variant in this process, repetitions
    interleaved; time, GFLOP/s, compute buffer and error against float64 on a sample of query rows."""
    from ..layers import attention

    todo: dict[AttentionShape, list[str]] = {}
    for family in families:
        for size in sizes:
            for shape, names in sd_attention_shapes(family, size).items():
                todo.setdefault(shape, []).extend(f"{family} {size}px {n}" for n in names)
    rng = np.random.default_rng(0)
    rows = []
    for i, (shape, names) in enumerate(sorted(todo.items(), key=lambda kv: -kv[0].flops)):
        c = shape.heads * shape.d
        q = (rng.standard_normal((shape.N, shape.Lq, c)) * 1.5).astype(np.float32)
        k = rng.standard_normal((shape.N, shape.Lk, c)).astype(np.float32)
        v = rng.standard_normal((shape.N, shape.Lk, c)).astype(np.float32)
        secs: dict[str, list[float]] = {a: [] for a in variants}
        first: dict[str, list[float]] = {a: [] for a in variants}
        buf: dict[str, int] = {}
        outs: dict[str, np.ndarray] = {}
        for _ in range(repeat):
            for a in variants:  # interleaved
                # Two runs per call: the first touches a freshly allocated compute buffer (page faults: 0.3 s for
                # upstream's 532 MB at 4096 tokens), the second is the steady state a model's sampling loop sees
                # (stable-diffusion.cpp keeps the UNet's compute buffer between steps).
                out, s, nbytes = attention(q, k, v, shape.heads, variant=a, threads=threads, repeat=2)
                first[a].append(s[0])
                secs[a].append(s[1])
                buf[a] = nbytes
                outs[a] = out[:, :64]
        ref = _attention_reference(q[:, :64], k, v, shape.heads)
        med = {a: statistics.median(secs[a]) for a in variants}
        rows.append({"Lq": shape.Lq, "Lk": shape.Lk, "heads": shape.heads, "d": shape.d, "N": shape.N,
                     "flops": shape.flops, "layers": names, "median_s": med, "seconds": secs,
                     "first_call_s": {a: statistics.median(first[a]) for a in variants},
                     "gflops": {a: shape.flops / med[a] / 1e9 for a in variants},
                     "speedup_vs_upstream": {a: med["upstream"] / med[a] for a in variants}
                     if "upstream" in variants else {},
                     "compute_bytes": buf,
                     "rel_error": {a: float(np.linalg.norm(outs[a] - ref) / np.linalg.norm(ref)) for a in variants}})
        if progress:
            progress(i + 1, len(todo), shape)
    return {"kind": "attention", "families": list(families), "sizes": list(sizes), "size": "/".join(map(str, sizes)),
            "threads": threads, "repeat": repeat, "variants": list(variants),
            "date": utc_now(),
            "machine": machine_info(), "build": build_info(), "rows": rows}


def _attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    n, lq, c = q.shape
    d = c // heads

    def split(x):
        return x.astype(np.float64).reshape(n, -1, heads, d).transpose(0, 2, 1, 3)

    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(n, lq, c)


def format_attention_table(report: dict) -> str:
    vs = report["variants"]
    head = f"{'Lq x Lk':>12} {'heads x d':>10} " + " ".join(f"{a + ' ms':>13}" for a in vs) + " " + \
        " ".join(f"{'x ' + a:>9}" for a in vs if a != "upstream") + " " + \
        " ".join(f"{a + ' MB':>11}" for a in vs) + f" {'GFLOP/s':>8} {'rel err':>8}  layers"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        best = min(vs, key=lambda a: r["median_s"][a])
        cells = f"{str(r['Lq']) + 'x' + str(r['Lk']):>12} {str(r['heads']) + 'x' + str(r['d']):>10} "
        cells += " ".join(f"{r['median_s'][a] * 1e3:>13.1f}" for a in vs)
        if r["speedup_vs_upstream"]:
            cells += " " + " ".join(f"{r['speedup_vs_upstream'][a]:>9.2f}" for a in vs if a != "upstream")
        cells += " " + " ".join(f"{r['compute_bytes'][a] / 2**20:>11.1f}" for a in vs)
        cells += f" {r['gflops'][best]:>8.1f} {max(r['rel_error'].values()):>8.1e}  {', '.join(r['layers'][:2])}"
        cells += f" (+{len(r['layers']) - 2})" if len(r["layers"]) > 2 else ""
        lines.append(cells)
    lines.append(footer(report, f"median of {report['repeat']}, GFLOP/s of the fastest variant"))
    return "\n".join(lines)
