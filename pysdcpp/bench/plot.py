"""The chart of a report (`pysdcpp bench --plot`): per-phase medians per variant, or per-layer speedups."""

from __future__ import annotations

import numpy as np


def plot_report(report: dict, path) -> None:
    """A chart a person reads at a glance: per-phase medians per variant, or per-layer speedups."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'pysdcpp[plot]'") from None
    fig, ax = plt.subplots(figsize=(10, 5.5))
    if report["kind"] == "model":
        phases = ["model_load", "text_encoding", "sampling", "vae_decode"]
        names = [n for n, e in report["summary"].items() if "phases" in e]
        left = np.zeros(len(names))
        for ph in phases:
            vals = np.array([report["summary"][n]["phases"].get(ph, {}).get("median", 0.0) for n in names])
            ax.barh(names, vals, left=left, label=ph)
            left += vals
        for i, n in enumerate(names):
            sp = report["summary"][n].get("speedup", {}).get("total")
            label = f"{left[i]:.1f} s" + (f"  ({sp:.2f}x)" if sp and n != report["baseline"] else "")
            ax.text(left[i], i, " " + label, va="center")
        ax.invert_yaxis()
        ax.set_xlim(0, float(left.max()) * 1.25 if len(names) else 1)  # room for the labels
        ax.set_xlabel("seconds (median)")
        ax.set_title(f"{report['size']} px, {report['steps']} steps, {report['threads']} threads")
        ax.legend(loc="lower right")
    else:
        rows = report["rows"]
        labels = [f"{r['C']}->{r['K']} @{r['H']}" for r in rows]
        algos = [a for a in report["algorithms"] if a != "im2col"]
        x = np.arange(len(rows))
        width = 0.8 / max(1, len(algos))
        for i, a in enumerate(algos):
            ax.bar(x + i * width, [r["speedup_vs_im2col"].get(a, 0) for r in rows], width, label=a)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x + width * (len(algos) - 1) / 2, labels, rotation=90, fontsize=7)
        ax.set_ylabel("speedup vs im2col")
        ax.set_title(f"3x3 convs of SD1.5 at {report['size']} px, {report['threads']} threads")
        ax.legend()
    m = report["machine"]
    fig.text(0.01, 0.01, f"{m['cpu']}, {report['date'][:10]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
