"""Render docs/benchmarks.md from `pysdcpp bench --json` reports (never typed by hand).

    python -m pysdcpp.bench_report docs/bench/*.json -o docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

PHASES = ["model_load", "text_encoding", "sampling", "vae_decode", "total"]


def _name(r: dict) -> str:
    return Path(r["model"]).name


def _cpu(m: dict) -> str:
    fam = f" family {m['cpu_family']} model {m['cpu_model']}" if "cpu_family" in m and "cpu_model" in m else ""
    return m["cpu"] + fam


def _machine(r: dict) -> str:
    m = r["machine"]
    return (f"{_cpu(m)} ({m['logical_cores']} logical cores; {', '.join(m['simd'])}), {m['system']}; "
            f"{r['threads']} threads; {r['date'][:10]}")


def _later_step(r: dict, name: str) -> float | None:
    """Median of a variant's steps after each generation's first (also for reports written before the summary
    carried it: the runs hold every step)."""
    if "later_step" in r["summary"].get(name, {}):
        return r["summary"][name]["later_step"]["median"]
    later = [s for run in r.get("runs", {}).get(name, []) if run.get("ok") for s in run.get("steps", [])[1:]]
    return statistics.median(later) if later else None


_FAMILY_NAMES = {"sd1": "SD1.5", "sd2": "SD2.1", "sdxl": "SDXL"}   # the synthetic models' published originals


def render_model(r: dict) -> list[str]:
    base = r["baseline"]
    cfg = r.get("guidance_scale")
    guidance = "" if cfg is None else ", no guidance" if cfg == 1.0 else f", guidance {cfg:g}"
    out = [f"### Generation, {r['size']} px, {r['steps']} steps{guidance}, median of {r['repeat']}",
           "", f"Machine: {_machine(r)}. Model: `{Path(r['model']).name}`. Variants: " +
           ", ".join(f"`{k}` = {v}" for k, v in r["variants"].items()) + ".", "",
           "| variant | " + " | ".join(PHASES) + " | per step | per later step | peak RSS | UNet compute buffer | "
           "UNet MACs | PSNR vs " + base + " |",
           "|---" * (len(PHASES) + 7) + "|"]
    for name, e in r["summary"].items():
        if "phases" not in e:
            out.append(f"| {name} | failed: {'; '.join(e['failed'])} |" + " |" * (len(PHASES) + 5))
            continue
        cells = []
        for p in PHASES:
            ph, sp = e["phases"].get(p), e["speedup"].get(p)
            cells.append("-" if not ph else f"{ph['median']:.2f} s" + (f" ({sp:.2f}x)" if sp and name != base else ""))
        step = e.get("step", {}).get("median")
        later, base_later = _later_step(r, name), _later_step(r, base)
        later_cell = "-" if later is None else f"{later:.2f} s" + (
            f" ({base_later / later:.2f}x)" if name != base and base_later else "")
        ps = e.get("psnr_vs_" + base)
        psnr = "-" if ps is None else "identical" if ps == float("inf") else f"{ps:.1f} dB"
        buf = e.get("compute_buffers_mb", {}).get("unet")
        kind = next((k for k in ("inheritance", "step_cache", "alter") if k in e), "alter")
        frac = e.get(kind, {}).get("fraction_of_dense_macs")
        kind = {"step_cache": "step cache", "alter": "ALTER"}.get(kind, kind)
        steps = r["variants"].get(name, {}).get("steps", r["steps"])
        out.append(f"| {name}" + (f" ({steps} steps)" if steps != r["steps"] else "") + " | " + " | ".join(cells) +
                   f" | {step:.2f} s | {later_cell} | {e['peak_rss'] / 2**20:.0f} MB | " + (f"{buf:.0f} MB" if buf else "-") +
                   " | " + (f"{100 * frac:.0f}% ({kind})" if frac is not None else "dense") + f" | {psnr} |")
    out += ["", "(x): speedup against the baseline, computed repetition by repetition (per later step: ratio of "
            "the medians). Per later step: the steps after each generation's first, the steady state once the "
            "first step's one-off work (hoisted filter transforms, buffer allocation) is done. UNet compute buffer: the "
            "working memory of the UNet graph as stable-diffusion.cpp allocates it (weights not included).", ""]
    return out


def as_run_speedup(row: dict) -> float | None:
    """A layer-table row's speedup over im2col with the variant the cost model runs in the models, if measured
    (None for reports older than the `as_run` field)."""
    a = row.get("as_run")
    if a == "im2col":
        return 1.0
    return row["speedup_vs_im2col"].get(a)


def render_layers(r: dict) -> list[str]:
    algos = r["algorithms"]
    family = _FAMILY_NAMES.get(r.get("family", "sd1"), r.get("family", "sd1"))
    out = [f"### 3x3 convolutions of {family} (UNet and VAE) at {r['size']} px, median of {r['repeat']}", "",
           f"Machine: {_machine(r)}. F16 weights; steady state (transformed filters cached; the one-off first call "
           "is in the JSON as `first_call_s`). Max error: normalised max |error| against a float64 convolution.", "",
           "| C -> K | map | layers | " + " | ".join(f"{a} ms" for a in algos) + " | " +
           " | ".join(f"speedup {a}" for a in algos if a != "im2col") +
           " | as run in a model | GFLOP/s best | max error (any algorithm) |",
           "|---" * (3 + 2 * len(algos)) + "|---|---|"]
    speedups = {a: [] for a in algos if a != "im2col"}
    as_run = []
    for row in r["rows"]:
        best = max(row["gflops"].values())
        sp = [row["speedup_vs_im2col"].get(a, float("nan")) for a in algos if a != "im2col"]
        for a in speedups:
            x = row["speedup_vs_im2col"].get(a, float("nan"))
            if math.isfinite(x):
                speedups[a].append(x)
        run = as_run_speedup(row)
        if run is not None and math.isfinite(run):
            as_run.append(run)
        ok = run is not None and math.isfinite(run)
        run_cell = f"{row['as_run']} ({run:.2f}x)" if ok else \
            (f"{row['as_run']} (not measured)" if "as_run" in row else "-")
        errors = [e for e in row["max_error"].values() if math.isfinite(e)]
        failed = "failed"   # layer_bench records why in the JSON (`errors`)
        out.append(f"| {row['C']} -> {row['K']} | {row['H']}x{row['W']} | {row['layers']} | " +
                   " | ".join(f"{row['median_s'][a] * 1e3:.1f}" if math.isfinite(row['median_s'][a]) else failed
                              for a in algos) + " | " +
                   " | ".join(f"{x:.2f}x" if math.isfinite(x) else "-" for x in sp) +
                   f" | {run_cell} | {best:.0f} | " + (f"{max(errors):.1e} |" if errors else "- |"))
    out += ["", "As run in a model: the variant the accelerated library's cost model picks for the layer "
            "(`pysdcpp.layers.conv_plan`: `winograd_f4`/`winograd_f2` hoist the filter transform, cached within "
            "the budget or in the graph; `_fused` transforms the filters inside the products; `im2col` is "
            "upstream's path) and its speedup over im2col in this table.", ""]
    for a, xs in {"as run": as_run, **speedups}.items():
        xs = sorted(xs)
        if xs:
            out.append(f"- {a}: median speedup {xs[len(xs) // 2]:.2f}x, slowest layer {xs[0]:.2f}x, fastest "
                       f"{xs[-1]:.2f}x over {len(xs)} distinct shapes.")
    out.append("")
    return out


def render_attention(r: dict) -> list[str]:
    vs = r["variants"]
    fams = " and ".join(_FAMILY_NAMES.get(f, f) for f in r.get("families", ["sd1", "sd2"]))
    out = [f"### Attention layers of {fams} (UNet and VAE) at {r['size']} px, median of {r['repeat']}", "",
           f"Machine: {_machine(r)}. F32 q, k, v in the layout the models hand over; `upstream` is upstream's own "
           "attention helper (hook off), `gemm` our padded-GEMM arrangement, `fused` the tiled kernel "
           "(`attention=\"fast\"`). Times are the steady state (second run on an allocated compute buffer, as "
           "in a sampling loop; the first run, with the buffer's page faults, is in the JSON as `first_call_s`). "
           "Memory: the graph's compute buffer (inputs included). Error: relative L2 against float64 on the first "
           "64 query rows.", "",
           "| L_q x L_k | heads x d | " + " | ".join(f"{a} ms" for a in vs) + " | " +
           " | ".join(f"speedup {a}" for a in vs if a != "upstream") + " | " + " | ".join(f"{a} MB" for a in vs) +
           " | GFLOP/s best | rel. error | layers |",
           "|---" * (4 + 3 * len(vs) - 1 + 1) + "|"]
    for row in r["rows"]:
        best = max(row["gflops"].values())
        sp = [row["speedup_vs_upstream"].get(a, float("nan")) for a in vs if a != "upstream"]
        layers = ", ".join(row["layers"][:3]) + (f" (+{len(row['layers']) - 3})" if len(row["layers"]) > 3 else "")
        out.append(f"| {row['Lq']} x {row['Lk']} | {row['heads']} x {row['d']} | " +
                   " | ".join(f"{row['median_s'][a] * 1e3:.1f}" for a in vs) + " | " +
                   " | ".join(f"{x:.2f}x" for x in sp) + " | " +
                   " | ".join(f"{row['compute_bytes'][a] / 2**20:.1f}" for a in vs) +
                   f" | {best:.0f} | {max(row['rel_error'].values()):.1e} | {layers} |")
    out.append("")
    return out


def render_experts(r: dict) -> list[str]:
    out = [f"### ALTER experts: one UNet evaluation at {r['size']} px, median of {r['repeat']}", "",
           f"Machine: {_machine(r)}. Model: `{_name(r)}`. Each expert at a timestep it serves against the dense "
           "model (routing off) at the same timestep, both in the accelerated library (Winograd, fast attention).",
           "", "| expert | timesteps | units skipped | MACs (of dense) | expert | dense | speedup |",
           "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        ranges = ", ".join(f"{a}-{b}" for a, b in row["timesteps"])
        out.append(f"| {row['expert']} | {ranges} | {len(row['skipped'])} | "
                   f"{100 * row['macs'] / row['dense_macs']:.1f}% | {row['median_s']['expert']:.2f} s | "
                   f"{row['median_s']['dense']:.2f} s | {row['speedup_vs_dense']:.2f}x |")
    out.append("")
    return out


def render_linear(r: dict) -> list[str]:
    ps = r["paths"]
    out = [f"### Linear layers of SD1.5's UNet at {r['size']} px, median of {r['repeat']}", "",
           f"Machine: {_machine(r)}. F16 weights, F32 activations, bias added; `upstream` is ggml's mul_mat (it "
           "rounds the activations to F16), `fast` our GEMM (`linear=\"fast\"`). Steady state (second run of "
           "each graph). Max error: normalised max |error| against float64 with the F16-rounded weights, first 64 "
           "rows.", "",
           "| rows x K -> N | " + " | ".join(f"{p} ms" for p in ps) + " | " +
           " | ".join(f"speedup {p}" for p in ps if p != "upstream") + " | " +
           " | ".join(f"{p} GFLOP/s" for p in ps) + " | max error | layers |",
           "|---" * (1 + 2 * len(ps) + (len(ps) - 1) + 2) + "|"]
    for row in r["rows"]:
        out.append(f"| {row['rows']} x {row['K']} -> {row['N']} | " +
                   " | ".join(f"{row['median_s'][p] * 1e3:.2f}" for p in ps) + " | " +
                   " | ".join(f"{row['speedup_vs_upstream'][p]:.2f}x" for p in ps if p != "upstream") + " | " +
                   " | ".join(f"{row['gflops'][p]:.0f}" for p in ps) +
                   f" | {max(row['max_error'].values()):.1e} | {'; '.join(row['layers'])} |")
    out.append("")
    return out


def render_batch(r: dict) -> list[str]:
    base = r["splits"][0]
    out = [f"### Batch throughput, {r['size']} px, {r['steps']} steps, {r['jobs']} jobs, median of {r['repeat']}", "",
           f"Machine: {_machine(r)}. Model: `{Path(r['model']).name}`. `pysdcpp batch` per split of the cores "
           "(workers x threads per worker), model loads included.", "",
           "| workers x threads | images/min | throughput vs " + base + " | per image (median) | run | peak RSS, all "
           "workers |", "|---|---|---|---|---|---|"]
    for name, e in r["summary"].items():
        rss = max((sum(x or 0 for x in run.get("peak_rss_per_worker", [])) for run in r["runs"][name]), default=0)
        out.append(f"| {name} | {60 * e['images_per_second']:.2f} | {e['throughput_vs_' + base]:.2f}x | "
                   f"{e['latency_median']:.2f} s | {e['seconds']:.1f} s | {rss / 2**20:.0f} MB |")
    return out + [""]


def render_peers(r: dict) -> list[str]:
    from .bench.peers import gen_note, task_names, vs_pysdcpp

    tasks = r["tasks"]
    names = task_names(r)
    versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
    out = [f"### Peer runtimes, {r['size']} px, median of {r['repeat']}", "",
           f"Machine: {_machine(r)}. Model: `{Path(r['model']).name}` ({versions}). Each runtime in a process of "
           "its own, one untimed call first; pysdcpp lives through the run, every other runtime through a phase "
           "of its own, timed in turn with pysdcpp (no two peers in memory at once). Runtimes: " +
           "; ".join(f"`{k}` {v}" for k, v in r["runtimes"].items()) + ".", "",
           "| runtime | " + " | ".join(names.get(t, t) for t in tasks) + " | peak RSS, runs | with setup |",
           "|---" * (len(tasks) + 3) + "|"]
    ours = r["summary"].get("pysdcpp", {})
    for rt, e in r["summary"].items():
        cells = []
        for t in tasks:
            if t not in e:
                cells.append("failed" if e.get("error") else "-")
                continue
            cell = f"{e[t]['median']:.2f} s"
            ratio = vs_pysdcpp(rt, e, t, ours)
            if ratio is not None:
                cell += f" ({ratio:.2f}x ours)"
            if "rel_l2_vs_torch" in e[t]:
                cell += f", rel. L2 {e[t]['rel_l2_vs_torch']:.1e}"
            if rt.startswith("pysdcpp-") and "rel_l2_vs_pysdcpp" in e[t]:
                cell += f" ({e[t]['rel_l2_vs_pysdcpp']:.1e} vs ours)"
            cells.append(cell)
        rss = [f"{e[k] / 2**20:.0f} MB" if e.get(k) else "-" for k in ("peak_rss_runs", "peak_rss")]
        out.append(f"| {rt} | " + " | ".join(cells + rss) + " |")
    out += ["", "(x ours): that runtime's time over pysdcpp's in the same phase; above 1, pysdcpp is faster. "
            "rel. L2: against PyTorch's output on the same inputs (pysdcpp's variants: also against pysdcpp's "
            "own). pysdcpp's time: the median over all phases. Peak RSS of the worker process: over its timed runs "
            "(the peak started over after setup: the model and what the runs take), and with setup (OpenVINO's: "
            "converting the PyTorch model and compiling one static model per task); older reports have the "
            "second only.", ""]
    if "gen" in r:
        out += [gen_note(r["gen"]), ""]
    return out + render_peer_profiles(r, names)


def render_peer_profiles(r: dict, names: dict) -> list[str]:
    """`--profile`: per task, each profiled runtime's seconds per op class."""
    from .bench.peer_profiles import profile_rows

    out = []
    for t in r["tasks"]:
        rts, rows = profile_rows(r, t)
        if not rts:
            continue
        out += [f"Where the time goes, {names.get(t, t)} ({r['size']} px, one profiled run after the timed ones):",
                "", "| op class | " + " | ".join(rts) + " |", "|---" * (len(rts) + 1) + "|"]
        for cls, cells in rows:
            out.append(f"| {cls} | " + " | ".join(f"{sec:.3f} s" + (f" ({ratio:.2f}x ours)" if ratio is not None else "")
                                                  for sec, ratio in cells) + " |")
        out.append("")
    if out:
        out += ["Ours and upstream's path: the accelerated library's node profiler (each node's wall time to the "
                "barrier after it); OpenVINO: its per-node performance counters (a model compiled with them on; "
                "they add up to 1.03-1.36x its wall time); "
                "PyTorch: torch.profiler's self CPU time per op.", ""]
    return out


def machine_key(r: dict) -> tuple:
    """What tells two machines apart in a report: CPU name, family/model where recorded, SIMD flags, cores."""
    m = r["machine"]
    return (m["cpu"], m.get("cpu_family"), m.get("cpu_model"), tuple(m["simd"]), m["logical_cores"])


def _setup_key(r: dict) -> tuple:
    return (_name(r), r["size"], r["steps"], r.get("guidance_scale"), tuple(r["variants"]), r["baseline"])


def render_machines(reports: list[dict]) -> list[str]:
    """Generation reports of one setup from several machines, side by side: each machine's own in-run ratios
    against its own baseline, and its baseline's absolute time as that machine's alone (never ranked)."""
    groups: dict[tuple, list[dict]] = {}
    for r in reports:
        if r["kind"] == "model":
            groups.setdefault(_setup_key(r), []).append(r)
    out = []
    for key, rs in groups.items():
        by_machine = {}
        for r in sorted(rs, key=lambda r: r["date"]):
            by_machine[machine_key(r)] = r  # the latest run of each machine
        if len(by_machine) < 2:
            continue
        name, size, steps, _, variants, base = key
        runs = list(by_machine.values())
        out += [f"### Across machines: `{name}`, {size} px, {steps} steps", "",
                "Each column is one machine's run, with its ratios against its own `" + base + "` measured in "
                "that run. Absolute times belong to their machine and are not compared across columns.", ""]
        heads = [f"{_cpu(r['machine'])} ({', '.join(r['machine']['simd'])}), {r['threads']} threads, "
                 f"{r['date'][:10]}" for r in runs]
        out += ["| variant | " + " | ".join(heads) + " |", "|---" * (len(runs) + 1) + "|"]
        for v in variants:
            cells = []
            for r in runs:
                e = r["summary"].get(v, {})
                if "phases" not in e:
                    cells.append("failed" if e else "-")
                elif v == base:
                    cells.append(f"baseline: sampling {e['phases']['sampling']['median']:.1f} s, total "
                                 f"{e['phases']['total']['median']:.1f} s")
                else:
                    sp = e.get("speedup", {})
                    cells.append(f"sampling {sp.get('sampling', float('nan')):.2f}x, total "
                                 f"{sp.get('total', float('nan')):.2f}x")
            out.append(f"| {v} | " + " | ".join(cells) + " |")
        out.append("")
    return out


_RENDER = {"model": render_model, "layers": render_layers, "attention": render_attention,
           "experts": render_experts, "linear": render_linear, "batch": render_batch, "peers": render_peers}
_ORDER = {"model": 0, "peers": 1, "batch": 2, "experts": 3, "attention": 4, "linear": 5, "layers": 6}


def render(reports: list[dict], notes: str = "") -> str:
    lines = ["# Benchmarks", "",
             "Generated by `python -m pysdcpp.bench_report` from the JSON that `pysdcpp bench --json` wrote "
             "(in `docs/bench/`); do not edit by hand. Upstream is stable-diffusion.cpp built from the same "
             "source with the same flags, measured in the same run. Latency does not depend on weight values, "
             "so the synthetic models time like real ones; PSNR does depend on them.", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    lines += render_machines(reports)
    for r in sorted(reports, key=lambda r: (_ORDER[r["kind"]], str(r["size"]))):
        lines += _RENDER[r["kind"]](r)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--notes", type=Path, default=None, help="Markdown placed above the tables.")
    args = ap.parse_args()
    reports = [json.loads(p.read_text()) for p in args.reports]
    notes = args.notes.read_text() if args.notes else ""
    args.output.write_text(render(reports, notes))


if __name__ == "__main__":
    main()
