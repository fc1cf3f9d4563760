"""The PNG of a subcommand whose ratios make a curve (`learn`: cost vs pass rate; `sync`: latency
vs model size)."""

from __future__ import annotations

from pathlib import Path


def plot_ratios(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, list[dict]],
    x: str,
    log: bool = False,
) -> None:
    """One line per series: `ratio` against `x` of each point, with min-max error bars where the
    points carry `min` and `max` (measured), dashed without (a reference line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in series.items():
        xs = [p[x] for p in pts]
        ys = [p["ratio"] for p in pts]
        if pts and "min" in pts[0]:
            err = [
                [y - p["min"] for y, p in zip(ys, pts, strict=True)],
                [p["max"] - y for y, p in zip(ys, pts, strict=True)],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        else:
            ax.plot(xs, ys, marker=".", linestyle="--", label=name)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
