"""The report's figures, each drawn on its own Agg canvas (no pyplot global state) and returned as PNG bytes:
WER on every dataset, the paper's Figure 1, the WER/size and WER/RTF trade-offs with their Pareto fronts, WER
vs SNR, and the sensitivity heat map."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from whisper_ptq.report.analysis import Layout, System, pareto_mask
from whisper_ptq.report.document import Plot

BASELINE_COLOR = "#555555"


def _new_figure(width: float, height: float, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure on its own Agg canvas: no pyplot global state, so reports can be drawn from any thread."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, **kwargs)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    return buffer.getvalue()


def colors_of(systems: Sequence[System]) -> dict[str, Any]:
    """One colour per recipe, the same in every figure; fp32 grey."""
    cmap = colormaps["tab10" if len(systems) <= 10 else "tab20"]
    quantized = [s for s in systems if not s.baseline]
    colors = {s.label: cmap(i % cmap.N) for i, s in enumerate(quantized)}
    return colors | {s.label: BASELINE_COLOR for s in systems if s.baseline}


# Label positions tried in turn, in points from the marker: the four snug ones first, then farther ones whose labels
# get a faint leader line back to their point.
LABEL_OFFSETS = [(6, 5), (6, -11), (-6, 5), (-6, -11), (6, 15), (-6, 15), (6, -21), (-6, -21)]
LABEL_OFFSETS += [(dx, dy) for dy in (28, -34, 40, -46) for dx in (14, -14)]
LEADER = {"arrowstyle": "-", "color": "0.6", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3}


def _annotate(ax: Axes, text: str, xy: tuple[float, float], offset: tuple[int, int], leader: bool = False) -> Any:
    ha = "left" if offset[0] > 0 else "right" if offset[0] < 0 else "center"
    arrow = {"arrowprops": LEADER} if leader else {}
    return ax.annotate(text, xy, xytext=offset, textcoords="offset points", fontsize=8, ha=ha, **arrow)


def _label_points(ax: Axes, points: Sequence[tuple[float, float, str]]) -> None:
    """Annotate points at the first offset where the label overlaps no other label or marker and stays inside."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = [_box_around(ax.transData.transform((x, y)), 5) for x, y, _ in points]  # the markers themselves
    for x, y, text in points:
        chosen, chosen_box = LABEL_OFFSETS[0], None
        for offset in LABEL_OFFSETS:
            trial = _annotate(ax, text, (x, y), offset)  # measured without a leader, whose line would overlap
            box = trial.get_window_extent(renderer)
            trial.remove()
            chosen_box = chosen_box or box  # nowhere free: keep the first position rather than drop the label
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                chosen, chosen_box = offset, box
                break
        _annotate(ax, text, (x, y), chosen, leader=chosen not in LABEL_OFFSETS[:4])
        placed.append(chosen_box)


def _box_around(center: np.ndarray, radius: float) -> Bbox:
    return Bbox.from_extents(*(center - radius), *(center + radius))


def figure_datasets(systems: Sequence[System], layout: Layout, colors: dict[str, Any]) -> Plot | None:
    """WER with its 95% CI on every dataset of the table, one bar per recipe in each dataset's group."""
    done = [s for s in systems if any(s.measures.get(d) and s.measures[d].wer_ci for d in layout.clean)]
    if not done:
        return None
    fig, ax = _new_figure(max(6.0, 1.6 + len(layout.clean) * (0.5 * len(done) + 0.6)), 4.2)
    width = 0.8 / len(done)
    for i, s in enumerate(done):
        cis = [s.measures[d].wer_ci if d in s.measures else None for d in layout.clean]
        xs = [j - 0.4 + width * (i + 0.5) for j, ci in enumerate(cis) if ci]
        wers = [ci.estimate for ci in cis if ci]
        yerr = [[ci.estimate - ci.low for ci in cis if ci], [ci.high - ci.estimate for ci in cis if ci]]
        hatch = "//" if s.baseline else None
        ax.bar(xs, wers, width, yerr=yerr, capsize=2, color=colors[s.label], edgecolor="black", linewidth=0.5,
               hatch=hatch, label=s.label, error_kw={"linewidth": 0.8})  # fmt: skip
    ax.set_xticks(range(len(layout.clean)), [layout.label(d) for d in layout.clean])
    ax.set_ylabel("WER (%), 95% CI")
    ax.set_title("WER on each dataset")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    caption = (
        "WER on each dataset of the table, one bar per recipe (fp32 hatched), with its 95% bootstrap CI over "
        "utterances."
    )
    return Plot("fig_wer_datasets.png", caption, _png(fig))


def figure_increase(systems: Sequence[System], layout: Layout, colors: dict[str, Any]) -> Plot | None:
    """The paper's Figure 1: WER on test-other minus WER on test-clean, per recipe (both must be there)."""
    if not layout.pair:
        return None
    easy_spec, hard_spec = layout.pair
    bars = [(s, s.wer(hard_spec) - s.wer(easy_spec)) for s in systems]
    bars = [(s, v) for s, v in bars if not math.isnan(v)]
    if not bars:
        return None
    easy, hard = layout.label(easy_spec), layout.label(hard_spec)
    fig, ax = _new_figure(max(6.0, 0.9 * len(bars) + 2), 4.2)
    x = np.arange(len(bars))
    ax.bar(x, [v for _, v in bars], color=[colors[s.label] for s, _ in bars], edgecolor="black", linewidth=0.5)
    for i, (_, v) in enumerate(bars):
        ax.annotate(f"{v:+.2f}", (i, v), xytext=(0, 3 if v >= 0 else -11), textcoords="offset points",
                    ha="center", fontsize=8, bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})  # fmt: skip
    base = next((v for s, v in bars if s.baseline), None)
    if base is not None:
        ax.axhline(base, color=BASELINE_COLOR, linestyle="--", linewidth=1, label=f"fp32 ({base:+.2f})")
        ax.legend(fontsize=8, loc="upper left")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, [s.label for s, _ in bars], rotation=25, ha="right")  # recipe names are long
    ax.set_ylabel(f"WER {hard} - WER {easy} (points)")
    ax.set_title(f"WER increase on {hard} relative to {easy}")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    caption = (
        f"Figure 1: WER increase on {hard} relative to {easy} (WER {hard} minus WER {easy}, percentage points) "
        "for each recipe; the dashed line is fp32's increase."
    )
    return Plot("fig_wer_increase.png", caption, _png(fig))


def figure_tradeoffs(systems: Sequence[System], layout: Layout, colors: dict[str, Any]) -> Plot | None:
    """WER vs size and WER vs RTF on the reference dataset, each with its 2-D Pareto front."""
    ref = layout.reference
    done = [s for s in systems if not math.isnan(s.wer(ref)) and s.measures[ref].wer_ci]
    if not done:
        return None
    label = layout.label(ref)
    fig, axes = _new_figure(12, 4.8, ncols=2)
    speeds = [s.speed(layout.clean) for s in done]
    rtfs = [sp.median if sp else math.nan for sp in speeds]
    rtf_err = np.array([[sp.median - sp.low, sp.high - sp.median] if sp else [0.0, 0.0] for sp in speeds]).T
    axes_spec = [
        (axes[0], [s.size_bytes / 1e6 for s in done], None, "saved size (MB) - lower is better"),
        (axes[1], rtfs, rtf_err, "real-time factor (RTF; median, min-max over passes) - lower is better"),
    ]
    wers = np.array([s.wer(ref) for s in done])
    cis = [s.measures[ref].wer_ci for s in done]
    yerr = np.array(
        [[w - ci.low for w, ci in zip(wers, cis, strict=True)], [ci.high - w for w, ci in zip(wers, cis, strict=True)]]
    )
    for ax, xs, xerr, xlabel in axes_spec:
        xs = np.array(xs, float)
        for i, s in enumerate(done):
            x_error = None if xerr is None else xerr[:, i : i + 1]
            ax.errorbar(xs[i], wers[i], yerr=yerr[:, i : i + 1], xerr=x_error, fmt="o", color=colors[s.label],
                        capsize=3, ms=6)  # fmt: skip
        valid = ~np.isnan(xs)
        front = np.zeros(len(done), bool)
        front[valid] = pareto_mask(np.column_stack([wers[valid], xs[valid]]))
        order = np.argsort(xs[front])
        ax.plot(
            xs[front][order],
            wers[front][order],
            "-",
            color="black",
            alpha=0.5,
            zorder=0,
            drawstyle="steps-post",
            label="Pareto front",
        )
        ax.scatter(xs[front], wers[front], s=160, facecolors="none", edgecolors="black", linewidths=1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"WER {label} (%), 95% CI")
        ax.grid(alpha=0.3)
        ax.margins(x=0.18, y=0.12)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title("Accuracy vs size")
    axes[1].set_title("Accuracy vs speed")
    fig.tight_layout()
    for ax, xs, _, _ in axes_spec:
        _label_points(ax, [(x, w, s.label) for x, w, s in zip(xs, wers, done, strict=True) if not math.isnan(x)])
    caption = (
        f"Trade-offs on {label} (the reference dataset): WER (with 95% bootstrap CI) against saved size and "
        "against RTF (median over timed passes, bars from min to max). Circled points, joined by the line, are "
        "the Pareto front (no other recipe is lower on both axes)."
    )
    return Plot("fig_tradeoffs.png", caption, _png(fig))


def snr_panels(layout: Layout) -> dict[tuple[str, str], list[float]]:
    """(base dataset, noise params) -> its SNRs ascending; the clean point is the base dataset itself."""
    panels: dict[tuple[str, str], set[float]] = {}
    for info in layout.noisy:
        panels.setdefault((info.base, info.noise), set()).add(info.snr)
    return {key: sorted(snrs) for key, snrs in panels.items()}


def snr_spec(layout: Layout, base: str, noise: str, snr: float | None) -> str:
    """The dataset of one point of a WER-vs-SNR line; the clean point is the base dataset itself."""
    if snr is None:
        return base
    return next((i.spec for i in layout.noisy if (i.base, i.noise, i.snr) == (base, noise, snr)), "")


def panel_title(layout: Layout, base: str, noise: str) -> str:
    kind = dict(item.split("=", 1) for item in noise.split(",") if "=" in item).get("kind", "white")
    return f"{layout.label(base)}, {kind} noise"


def figure_snr(systems: Sequence[System], layout: Layout, colors: dict[str, Any]) -> Plot | None:
    panels = snr_panels(layout)
    if not panels:
        return None
    fig, axes = _new_figure(5.5 * len(panels), 4.2, ncols=len(panels), sharey=True, squeeze=False)
    for ax, ((base, noise), snrs) in zip(axes[0], panels.items(), strict=True):
        levels = [*snrs, None]
        for s in systems:
            ys = [s.wer(snr_spec(layout, base, noise, snr)) for snr in levels]
            if all(math.isnan(y) for y in ys):
                continue  # a failed recipe: keep it out of the legend
            # fp32 dashed and on top, so that recipes identical to it do not hide it.
            style, zorder = ("--", 3) if s.baseline else ("-", 2)
            ax.plot(range(len(levels)), ys, style, marker="o", color=colors[s.label], label=s.label, zorder=zorder)
        ax.set_xticks(range(len(levels)), [f"{snr:g}" for snr in snrs] + ["clean"])
        ax.set_xlabel("SNR (dB)")
        ax.set_title(panel_title(layout, base, noise))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("WER (%)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    caption = (
        "WER against signal-to-noise ratio, one line per recipe (fp32 dashed); the right-most point is the clean audio."
    )
    return Plot("fig_wer_snr.png", caption, _png(fig))


def heatmap_png(
    cells: Sequence[tuple[int | None, str, float]], columns: Sequence[str], title: str, label: str
) -> bytes | None:
    """(row index, column, value) cells as a heat map diverging around 0 (red above, blue below), one value
    printed per cell; rows are the indices ascending, None ("all layers") on top. Blank: not measured."""
    if not cells:
        return None
    columns = list(columns)
    layers: list[int | None] = sorted({layer for layer, _, _ in cells} - {None})
    if any(layer is None for layer, _, _ in cells):
        layers.insert(0, None)
    grid = np.full((len(layers), len(columns)), np.nan)
    for layer, column, value in cells:
        grid[layers.index(layer), columns.index(column)] = value
    fig, ax = _new_figure(1.6 * len(columns) + 1.5, 0.45 * len(layers) + 1.6)
    spread = max(1e-6, float(np.nanmax(np.abs(grid))))  # symmetric: red costs WER, blue (noise) gains
    image = ax.imshow(grid, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -spread, spread), aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            color = "white" if abs(value) > 0.6 * spread else "black"  # readable on the darkest cells
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), ["all layers" if i is None else f"layer {i}" for i in layers])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    return _png(fig)
