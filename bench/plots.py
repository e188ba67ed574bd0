"""PNG plots of an ``engram-bench`` result (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import has_link  # noqa: E402


@contextmanager
def figure(res: dict, what: str, path: Path) -> Iterator[plt.Axes]:
    """Axes to draw on; titled with the model and device, saved to ``path`` on exit."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        yield ax
        title = f"{what}\n{res['model']['description']} on {res['environment']['device']}"
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_penalty_vs_batch(res: dict, path: Path) -> Path:
    """Median penalties; the grey band is the baseline's own spread (the noise)."""
    with figure(res, "offload penalty vs batch size (grey: baseline's spread)", path) as ax:
        noise = [(s["batch_size"], s["penalty"]["noise_pct"]) for s in res["rows"][0]["sweep"]]
        noise = [(b, n) for b, n in noise if n is not None]
        if noise:
            xs, ns = zip(*noise)
            ax.fill_between(xs, [-n for n in ns], ns, color="grey", alpha=0.25, lw=0)
        for row in res["rows"][1:]:
            pts = [(s["batch_size"], s["penalty"]["pct"]) for s in row["sweep"]]
            pts = [(b, p) for b, p in pts if p is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=row["name"])
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode batch size (sequences)")
        ax.set_ylabel(f"decode penalty vs {res['rows'][0]['name']} (%)")
        if len(res["rows"]) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return path


def plot_stall_per_layer(res: dict, path: Path) -> Path:
    rows = res["rows"]
    layers = sorted({lid for r in rows for lid in r["paper"]["all"]["layers"]}, key=int)
    width = 0.8 / max(len(rows), 1)
    with figure(res, "stall per Engram layer, paper workload", path) as ax:
        for k, r in enumerate(rows):
            per = r["paper"]["all"]["layers"]
            ys = [per[lid]["stall_ms_per_step"] if lid in per else 0.0 for lid in layers]
            xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(layers))]
            ax.bar(xs, ys, width, label=r["name"])
        ax.set_xticks(range(len(layers)), [f"layer {lid}" for lid in layers])
        ax.set_ylabel("stall per step (ms)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return path


def plot_gbps_vs_rows(res: dict, path: Path) -> Path:
    """One panel per row width: GB/s per path (colour), bf16 solid with circles and fp8 dashed
    with open squares, on a log scale (fp8 rows are a fraction of bf16's GB/s on CPU), against
    the link ceiling where there is a link (CUDA); a CPU has none."""
    micro, ceil = res.get("micro") or {}, res["ceiling"]
    link = has_link(res)
    widths = sorted({m.get("values", 0) for m in micro.get("rows", [])}) or [0]
    fig, axes = plt.subplots(1, len(widths), figsize=(4.2 * len(widths), 4.5), squeeze=False)
    styles = {"bf16": dict(ls="-", marker="o"), "fp8": dict(ls="--", marker="s", mfc="none")}
    try:
        for ax, values in zip(axes[0], widths):
            rows = [m for m in micro.get("rows", []) if m.get("values", 0) == values]
            for k, p in enumerate(micro.get("paths", [])):
                for fmt, style in styles.items():
                    pts = [(m["rows"], m[f"{p}_gbps"]) for m in rows if m.get("format") == fmt]
                    if pts:
                        ax.plot(*zip(*pts), color=f"C{k}", label=f"{p} {fmt}", **style)
            if link:
                ax.axhline(ceil["gbps"], color="black", ls=":", lw=1, label="link ceiling")
            ax.set_xscale("log", base=2)
            if rows:
                ax.set_yscale("log")
            ax.set_xlabel("rows per gather")
            ax.set_title(f"{values} values per row" if values else "", fontsize=9)
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel("GB/s (bytes moved, log scale)")
        if micro.get("skipped"):
            axes[0][0].text(0.5, 0.5, micro["skipped"], transform=axes[0][0].transAxes,
                            ha="center", fontsize=8)  # fmt: skip
        axes[0][-1].legend(fontsize=7, handlelength=3.5)
        what = f"ceiling: {ceil['label']}" if link else "no link on CPU, so no ceiling"
        fig.suptitle(
            f"gather bandwidth vs rows ({what})\n"
            f"{res['model']['description']} on {res['environment']['device']}",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def write_plots(res: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    return [
        plot_penalty_vs_batch(res, out_dir / "penalty_vs_batch.png"),
        plot_stall_per_layer(res, out_dir / "stall_per_layer.png"),
        plot_gbps_vs_rows(res, out_dir / "gbps_vs_rows.png"),
    ]
