"""The chart of a report (`pysdcpp bench --plot`): per-phase medians per variant, per-layer speedups, or each
runtime's time per task (--peers)."""

from __future__ import annotations

import numpy as np


def plot_report(report: dict, path) -> None:
    """A chart a person reads at a glance: per-phase medians per variant, per-layer speedups, or the peers'
    times per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'pysdcpp[plot]'") from None
    if report["kind"] == "peers":
        fig = _plot_peers(plt, report)
    elif report["kind"] == "model":
        fig, ax = plt.subplots(figsize=(10, 5.5))
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
        fig, ax = plt.subplots(figsize=(10, 5.5))
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


def _plot_peers(plt, report: dict):
    """One panel per task: each runtime's median (min-max as the error bar), labelled with its time over
    pysdcpp's measured in turn with it."""
    from .peers import task_names, vs_pysdcpp

    tasks, summary = report["tasks"], report["summary"]
    names = task_names(report)
    size = (max(7.5, 4.2 * len(tasks)), 0.45 * len(summary) + 1.8)
    fig, axes = plt.subplots(1, len(tasks), figsize=size, squeeze=False)
    ours = summary.get("pysdcpp", {})
    for ax, t in zip(axes[0], tasks):
        rts = [rt for rt, e in summary.items() if t in e]
        med = np.array([summary[rt][t]["median"] for rt in rts])
        err = np.array([[m - summary[rt][t]["min"], summary[rt][t]["max"] - m] for rt, m in zip(rts, med)]).T
        ax.barh(rts, med, xerr=err if len(rts) else None,
                color=["tab:green" if rt == "pysdcpp" else "tab:gray" for rt in rts])
        for i, rt in enumerate(rts):
            ratio = vs_pysdcpp(rt, summary[rt], t, ours)
            label = f" {med[i]:.2f} s" + (f" ({ratio:.2f}x)" if ratio is not None else "")
            ax.text(summary[rt][t]["max"], i, label, va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, float(med.max()) * 1.5 if len(med) else 1)
        ax.set_title(names.get(t, t), fontsize=10)
        ax.set_xlabel("seconds (median)")
    fig.suptitle(f"{report['family']} at {report['size']} px, {report['threads']} threads; (x): time over "
                 "pysdcpp's, same phase", fontsize=10)
    return fig
