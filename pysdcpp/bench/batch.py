"""The batch benchmark (`pysdcpp bench --batch`): images per second of one prompt set run with different
splits of the cores into workers x threads, interleaved, and its table."""

from __future__ import annotations

import statistics
import tempfile

from .machine import build_info, footer, machine_info, utc_now


def parse_splits(text: str) -> list[tuple[int, int]]:
    """"1x2,2x1" -> [(1, 2), (2, 1)]: workers x threads per worker."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        w, _, t = part.partition("x")
        if not (w.isdigit() and t.isdigit()) or int(w) < 1 or int(t) < 1:
            raise ValueError(f"a split is WORKERSxTHREADS such as 2x1, got {part!r}")
        out.append((int(w), int(t)))
    if not out:
        raise ValueError("give at least one split, e.g. 1x2,2x1")
    return out


def batch_bench(model: str, splits: list[tuple[int, int]], size: int = 256, steps: int = 10, jobs: int = 6,
                repeat: int = 1, progress=None) -> dict:
    """Each split generates the same `jobs` prompts into a fresh folder (model loads included: what a user waits
    for), repetitions interleaved."""
    from ..batch import run_batch

    if size <= 0 or size % 64:
        raise ValueError(f"size must be a positive multiple of 64, got {size}")
    if jobs < 1 or steps < 1 or repeat < 1:
        raise ValueError("jobs, steps and repeat must be at least 1")
    runs: dict[str, list[dict]] = {f"{w}x{t}": [] for w, t in splits}
    with tempfile.TemporaryDirectory(prefix="pysdcpp-batch-bench-") as tmp:
        prompts = f"{tmp}/prompts.txt"
        with open(prompts, "w") as f:
            f.write("\n".join(f"a lighthouse at dusk, variation {i}" for i in range(jobs)) + "\n")
        for rep in range(repeat):
            for w, t in splits:
                s = run_batch(model, prompts, f"{tmp}/out-{w}x{t}-{rep}", defaults={"width": size, "height": size,
                                                                                      "num_inference_steps": steps},
                              workers=w, threads_per_worker=t)
                d = s.as_dict()
                r = {"seconds": s.seconds, "images": s.generated, "failed": len(s.failed),
                     "images_per_second": d["images_per_second"], "latency_median": d["latency_median"],
                     "latency_p95": d["latency_p95"], "peak_rss_per_worker": [x.get("peak_rss") for x in s.workers]}
                runs[f"{w}x{t}"].append(r)
                if progress:
                    progress(rep, f"{w}x{t}", r)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {"images_per_second": statistics.median(r["images_per_second"] for r in rs),
                         "latency_median": statistics.median(r["latency_median"] or 0 for r in rs),
                         "seconds": statistics.median(r["seconds"] for r in rs),
                         "failed": sum(r["failed"] for r in rs)}
    base = next(iter(summary))
    for e in summary.values():
        e["throughput_vs_" + base] = e["images_per_second"] / summary[base]["images_per_second"]
    return {"kind": "batch", "model": str(model), "size": size, "steps": steps, "jobs": jobs, "repeat": repeat,
            "threads": max(w * t for w, t in splits), "splits": list(runs), "date": utc_now(),
            "machine": machine_info(), "build": build_info(), "summary": summary, "runs": runs}


def format_batch_table(report: dict) -> str:
    head = f"{'workers x threads':<18}{'images/min':>11}{'vs first':>9}{'per image':>11}{'run':>9}{'failed':>7}"
    lines = [head, "-" * len(head)]
    base = report["splits"][0]
    for name, e in report["summary"].items():
        lines.append(f"{name:<18}{60 * e['images_per_second']:>11.2f}{e['throughput_vs_' + base]:>8.2f}x"
                     f"{e['latency_median']:>10.2f}s{e['seconds']:>8.1f}s{e['failed']:>7}")
    lines.append(footer(report, f"{report['jobs']} jobs of {report['steps']} steps per split, model loads included, "
                                f"median of {report['repeat']}"))
    return "\n".join(lines)
