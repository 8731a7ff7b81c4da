"""The study report: report.md, a self-contained report.html, table.csv, results.json and fig_*.png.

Input is the results contract (one dict per (model, recipe, dataset) task, see `store.Store.results`). Every
number shown is computed here from the per-utterance rows, through the one place each is defined: WER, CER and
RTF by `evaluate.summarize`, intervals and paired tests by `stats`. The deployment guidance is derived from
those numbers with explicit rules (tolerance, Pareto dominance, significance), never written by hand.

The report is first built as a list of blocks (headings, paragraphs, tables, figures) and then rendered to
Markdown and HTML, so both formats say exactly the same thing.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from whisper_ptq.evaluate import UtteranceResult, summarize
from whisper_ptq.stats import Interval, PairedTest, bootstrap_rate_ci, paired_rows_test

DEFAULT_TOLERANCE = 1.0  # WER points above fp32 on the reference dataset that still count as "within tolerance"
ALPHA = 0.05
STATUS_RANK = {"done": 0, "partial": 1, "skipped": 2, "failed": 3}  # a row is as bad as its worst task
BASELINE_COLOR = "#555555"


# ----------------------------------------------------------------------------------------------- input model


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset spec split into its clean base and its noise level, if any."""

    spec: str
    base: str  # the spec without its noise modifier
    snr: float | None  # dB; None for a clean (non-noise) dataset
    noise: str  # the noise parameters other than snr (kind, seed): one WER-vs-SNR panel each

    @property
    def label(self) -> str:
        """The paper's short names for the two LibriSpeech test sets, the spec otherwise."""
        for split, short in (("test-clean", "clean"), ("test-other", "other")):
            if split in self.base:
                return short if self.snr is None else f"{short} @ {self.snr:g} dB"
        return self.spec


def parse_dataset(spec: str) -> DatasetInfo:
    base_parts, snr, noise = [], None, ""
    for part in spec.split("+"):
        name, _, params = part.partition(":")
        if name != "noise" or not base_parts:
            base_parts.append(part)
            continue
        values = dict(item.split("=", 1) for item in params.split(",") if "=" in item)
        snr = float(values.pop("snr"))
        noise = ",".join(f"{k}={v}" for k, v in values.items())
    return DatasetInfo(spec, "+".join(base_parts), snr, noise)


@dataclass
class Measure:
    """One task: a (model, recipe) on one dataset."""

    dataset: str
    status: str
    error: str | None
    rows: list[UtteranceResult]
    stats: dict[str, float] = field(default_factory=dict)  # evaluate.summarize(rows); empty without rows
    wer_ci: Interval | None = None

    @classmethod
    def from_task(cls, task: dict[str, Any]) -> Measure:
        rows = [UtteranceResult(**u) for u in task.get("utterances") or []]
        measure = cls(task["dataset"], task.get("status", "done"), task.get("error"), rows)
        if rows:
            measure.stats = _row_stats(task.get("summary") or {}, rows)
            measure.wer_ci = bootstrap_rate_ci([r.word_errors for r in rows], [r.ref_words for r in rows])
        return measure

    @property
    def wer(self) -> float:
        return self.stats.get("wer", math.nan)

    @property
    def cer(self) -> float:
        return self.stats.get("cer", math.nan)


SUMMARY_KEYS = ("n_utterances", "audio_seconds", "wer", "cer", "rtf")


def _row_stats(summary: dict[str, Any], rows: list[UtteranceResult]) -> dict[str, float]:
    """summarize(rows), reusing the task summary when the store already computed it from these same rows:
    re-normalizing every transcript costs about a minute per full LibriSpeech sweep."""
    if all(k in summary for k in SUMMARY_KEYS) and summary["n_utterances"] == len(rows):
        return {k: summary[k] for k in SUMMARY_KEYS}
    return summarize(rows)


@dataclass
class System:
    """One (model, recipe): a row of Table 1."""

    model: str
    recipe: str
    spec: dict[str, Any]
    info: dict[str, Any]  # the first non-empty task summary: size, bits, device, threads...
    measures: dict[str, Measure]
    label: str = ""

    @property
    def baseline(self) -> bool:
        return self.recipe == "fp32" or (self.spec.get("library"), self.spec.get("weights")) == ("reference", "fp32")

    @property
    def status(self) -> str:
        return max((m.status for m in self.measures.values()), key=lambda s: STATUS_RANK.get(s, 3), default="done")

    @property
    def error(self) -> str | None:
        return next((m.error for m in self.measures.values() if m.error), None)

    def wer(self, dataset: str) -> float:
        measure = self.measures.get(dataset)
        return measure.wer if measure else math.nan

    def rtf(self, datasets: Sequence[str]) -> float:
        """Compute seconds over audio seconds pooled over `datasets`: the per-dataset RTFs weighted by audio."""
        stats = [self.measures[d].stats for d in datasets if d in self.measures and self.measures[d].stats]
        audio = sum(s["audio_seconds"] for s in stats)
        return sum(s["rtf"] * s["audio_seconds"] for s in stats) / audio if audio else math.nan

    @property
    def size_reduction(self) -> float:
        return float(self.info.get("size_reduction", 0.0 if self.baseline else math.nan))


def build_systems(results: Iterable[dict[str, Any]]) -> list[System]:
    """Group tasks into (model, recipe) rows, keeping experiment order but each model's fp32 first."""
    systems: dict[tuple[str, str], System] = {}
    for task in results:
        key = (task["model"], task["recipe"])
        if key not in systems:
            systems[key] = System(task["model"], task["recipe"], task.get("recipe_spec") or {}, {}, {})
        system = systems[key]
        system.measures[task["dataset"]] = Measure.from_task(task)
        system.info = system.info or dict(task.get("summary") or {})
    models = list(dict.fromkeys(model for model, _ in systems))
    ordered = sorted(systems.values(), key=lambda s: (models.index(s.model), not s.baseline))
    for system in ordered:
        system.label = system.recipe if len(models) == 1 else f"{system.model}/{system.recipe}"
    return ordered


@dataclass(frozen=True)
class Layout:
    """Which datasets play which role in the report."""

    clean: list[str]  # non-noise datasets, experiment order: the table's WER/CER column pairs
    easy: str | None  # Figure 1's reference point (test-clean), None with a single clean dataset
    hard: str  # the reference dataset for trade-offs and guidance (test-other, else the last clean dataset)
    noisy: list[DatasetInfo]

    @classmethod
    def of(cls, systems: Sequence[System]) -> Layout:
        specs = list(dict.fromkeys(d for s in systems for d in s.measures))
        infos = [parse_dataset(d) for d in specs]
        clean = [i.spec for i in infos if i.snr is None] or specs[:1]
        hard = next((d for d in clean if "test-other" in d), clean[-1])
        easy = next((d for d in clean if "test-clean" in d), clean[0])
        return cls(clean, easy if easy != hard else None, hard, [i for i in infos if i.snr is not None])


# ---------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Comparison:
    """A recipe against its model's fp32 on one dataset, utterances joined by id."""

    system: System
    dataset: str
    test: PairedTest

    @property
    def significant(self) -> bool:
        return self.test.significant(ALPHA)

    @property
    def verdict(self) -> str:
        t, name = self.test, self.system.label
        if self.significant:
            direction = "worse" if t.difference > 0 else "better"
            return f"significantly {direction} than fp32 at 5% ({format_p(t.p_value)})"
        claim = "beats fp32" if t.difference < 0 else "is worse than fp32" if t.difference > 0 else "differs from fp32"
        return (
            f"not significantly different from fp32 at 5% ({format_p(t.p_value)}); "
            f"this sample cannot support a claim that {name} {claim}"
        )

    def to_dict(self) -> dict[str, Any]:
        t = self.test
        return {
            "model": self.system.model,
            "recipe": self.system.recipe,
            "dataset": self.dataset,
            "wer_difference": t.difference,
            "ci_low": t.low,
            "ci_high": t.high,
            "p_value": t.p_value,
            "n_utterances": t.n,
            "n_changed": t.changed,
            "significant": self.significant,
            "verdict": self.verdict,
        }


def compare(system: System, baseline: System, dataset: str) -> Comparison | None:
    mine, ref = system.measures.get(dataset), baseline.measures.get(dataset)
    if not (mine and ref and mine.rows and ref.rows and mine.status == ref.status == "done"):
        return None
    test = paired_rows_test(ref.rows, mine.rows)
    return None if test is None else Comparison(system, dataset, test)


def all_comparisons(systems: Sequence[System], datasets: Sequence[str]) -> list[Comparison]:
    baselines = {s.model: s for s in systems if s.baseline}
    found = (
        compare(s, baselines[s.model], d) for d in datasets for s in systems if not s.baseline and s.model in baselines
    )
    return [c for c in found if c]


def dominates(p: np.ndarray, q: np.ndarray) -> bool:
    """p is at least as good as q everywhere and better somewhere; every coordinate is minimised."""
    return bool(np.all(p <= q) and np.any(p < q))


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """True for points no other point dominates."""
    return np.array([not any(dominates(other, p) for other in points) for p in points], bool)


# ------------------------------------------------------------------------------------------------ guidance


def guidance(systems: Sequence[System], layout: Layout, comps: Sequence[Comparison], tolerance: float) -> list[dict]:
    """Per model: the fastest and smallest recipes within tolerance, the most robust, and those to avoid."""
    return [
        _model_guidance(model, systems, layout, comps, tolerance) for model in dict.fromkeys(s.model for s in systems)
    ]


def _model_guidance(
    model: str, systems: Sequence[System], layout: Layout, comps: Sequence[Comparison], tol: float
) -> dict[str, Any]:
    ref = layout.hard
    mine = [s for s in systems if s.model == model and s.status == "done"]
    base = next((s for s in mine if s.baseline), None)
    out: dict[str, Any] = {"model": model, "reference_dataset": ref, "tolerance": tol}
    if base is None or math.isnan(base.wer(ref)):
        out["note"] = f"guidance needs a completed fp32 baseline for {model}; none was found"
        return out
    quantized = [s for s in mine if not s.baseline and not math.isnan(s.wer(ref))]
    within = [s for s in quantized if s.wer(ref) <= base.wer(ref) + tol]
    out["fp32"] = _numbers(base, base, layout)
    out["within_tolerance"] = [s.recipe for s in within]
    fastest = min(within, key=lambda s: s.rtf(layout.clean), default=None)
    smallest = max(within, key=lambda s: s.size_reduction, default=None)
    out["fastest"] = _numbers(fastest, base, layout) if fastest else None
    out["smallest"] = _numbers(smallest, base, layout) if smallest else None
    ranked = [s for s in quantized if not math.isnan(_robustness(s, base, layout))]
    robust = min(ranked, key=lambda s: _robustness(s, base, layout), default=None)
    out["most_robust"] = _numbers(robust, base, layout) if robust else None
    out["avoid"] = _avoid(mine, comps, layout)
    return out


def _robustness(system: System, base: System, layout: Layout) -> float:
    """Figure 1's increase hard - easy when both exist, else the degradation vs fp32 on the hard dataset."""
    if layout.easy:
        return system.wer(layout.hard) - system.wer(layout.easy)
    return system.wer(layout.hard) - base.wer(layout.hard)


def _numbers(system: System, base: System, layout: Layout) -> dict[str, Any]:
    rtf, base_rtf = system.rtf(layout.clean), base.rtf(layout.clean)
    return {
        "recipe": system.recipe,
        "wer": system.wer(layout.hard),
        "wer_vs_fp32": system.wer(layout.hard) - base.wer(layout.hard),
        "wer_increase": system.wer(layout.hard) - system.wer(layout.easy) if layout.easy else None,
        "rtf": rtf,
        "speedup": base_rtf / rtf if rtf else math.nan,
        "size_reduction": system.size_reduction,
    }


def _avoid(systems: Sequence[System], comps: Sequence[Comparison], layout: Layout) -> list[dict[str, Any]]:
    """Recipes significantly worse than fp32 on some dataset, or dominated on WER, size and RTF at once."""
    avoid = []
    for system in systems:
        if system.baseline:
            continue
        reasons = [
            f"significantly worse than fp32 on {parse_dataset(c.dataset).label} "
            f"({c.test.difference:+.2f} WER points, {format_p(c.test.p_value)})"
            for c in comps
            if c.system is system and c.significant and c.test.difference > 0
        ]
        point = _objectives(system, layout)
        dominators = [o for o in systems if dominates(_objectives(o, layout), point)]
        if dominators:
            best = min(dominators, key=lambda o: o.wer(layout.hard))
            reasons.append(f"dominated by {best.recipe} ({_versus(best, system, layout)})")
        if reasons:
            avoid.append({"recipe": system.recipe, "reasons": reasons})
    return avoid


def _objectives(system: System, layout: Layout) -> np.ndarray:
    """(WER, -size reduction, RTF), all minimised; a missing number counts as worst."""
    point = np.array([system.wer(layout.hard), -system.size_reduction, system.rtf(layout.clean)])
    return np.nan_to_num(point, nan=np.inf)


def _versus(a: System, b: System, layout: Layout) -> str:
    return (
        f"WER {a.wer(layout.hard):.2f} vs {b.wer(layout.hard):.2f}, size reduction {a.size_reduction:.0%} vs "
        f"{b.size_reduction:.0%}, RTF {a.rtf(layout.clean):.3f} vs {b.rtf(layout.clean):.3f}"
    )


def guidance_sentences(g: dict[str, Any], layout: Layout) -> list[str]:
    if "note" in g:
        return [g["note"]]
    ref, tol = parse_dataset(g["reference_dataset"]).label, g["tolerance"]
    fp32 = g["fp32"]
    lines = [
        f"Tolerance: WER on {ref} at most fp32 + {tol:g} points ({fp32['wer']:.2f} + {tol:g} = "
        f"{fp32['wer'] + tol:.2f}); within it: {', '.join(g['within_tolerance']) or 'no quantized recipe'}."
    ]
    if g["fastest"]:
        f = g["fastest"]
        lines.append(
            f"Fastest quantized recipe within tolerance: **{f['recipe']}**, RTF {f['rtf']:.3f} vs fp32 "
            f"{fp32['rtf']:.3f} ({f['speedup']:.2f}x), WER {ref} {f['wer']:.2f} ({f['wer_vs_fp32']:+.2f} vs fp32)."
            + (" It is slower than fp32: none within tolerance speeds inference up here." if f["speedup"] < 1 else "")
        )
    if g["smallest"]:
        s = g["smallest"]
        lines.append(
            f"Smallest within tolerance: **{s['recipe']}**, size reduction {s['size_reduction']:.0%}, "
            f"WER {ref} {s['wer']:.2f} ({s['wer_vs_fp32']:+.2f} vs fp32)."
        )
    if g["most_robust"]:
        r = g["most_robust"]
        how = (
            f"WER increase {ref} - {parse_dataset(layout.easy).label} {r['wer_increase']:+.2f} points "
            f"(fp32 {fp32['wer_increase']:+.2f})"
            if layout.easy
            else f"WER {ref} {r['wer_vs_fp32']:+.2f} vs fp32"
        )
        lines.append(f"Most robust on {ref}: **{r['recipe']}**, {how}, WER {ref} {r['wer']:.2f}.")
    for a in g["avoid"]:
        lines.append(f"Avoid **{a['recipe']}**: {'; '.join(a['reasons'])}.")
    if not g["avoid"]:
        lines.append("No recipe is significantly worse than fp32 or dominated on all three axes.")
    return lines


# -------------------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Plot:
    name: str  # file name, fig_*.png
    caption: str
    png: bytes


def _new_figure(width: float, height: float, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure on its own Agg canvas: no pyplot global state, so reports can be drawn from any thread."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, **kwargs)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    return buffer.getvalue()


def _colors(systems: Sequence[System]) -> dict[str, Any]:
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


def figure_increase(systems: Sequence[System], layout: Layout, colors: dict[str, Any]) -> Plot | None:
    """The paper's Figure 1: WER on the hard set minus WER on the easy set, per recipe."""
    if not layout.easy:
        return None
    bars = [(s, s.wer(layout.hard) - s.wer(layout.easy)) for s in systems]
    bars = [(s, v) for s, v in bars if not math.isnan(v)]
    if not bars:
        return None
    easy, hard = parse_dataset(layout.easy).label, parse_dataset(layout.hard).label
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
    """WER vs size reduction and WER vs RTF, each with its 2-D Pareto front."""
    done = [s for s in systems if not math.isnan(s.wer(layout.hard)) and s.measures[layout.hard].wer_ci]
    if not done:
        return None
    hard = parse_dataset(layout.hard).label
    fig, axes = _new_figure(12, 4.8, ncols=2)
    axes_spec = [
        (axes[0], [100 * s.size_reduction for s in done], -1, "size reduction vs fp32 (%) - higher is better"),
        (axes[1], [s.rtf(layout.clean) for s in done], 1, "real-time factor (RTF) - lower is better"),
    ]
    wers = np.array([s.wer(layout.hard) for s in done])
    cis = [s.measures[layout.hard].wer_ci for s in done]
    yerr = np.array(
        [[w - ci.low for w, ci in zip(wers, cis, strict=True)], [ci.high - w for w, ci in zip(wers, cis, strict=True)]]
    )
    for ax, xs, sign, xlabel in axes_spec:
        xs = np.array(xs, float)
        for i, s in enumerate(done):
            ax.errorbar(xs[i], wers[i], yerr=yerr[:, i : i + 1], fmt="o", color=colors[s.label], capsize=3, ms=6)
        valid = ~np.isnan(xs)
        front = np.zeros(len(done), bool)
        front[valid] = pareto_mask(np.column_stack([wers[valid], sign * xs[valid]]))
        order = np.argsort(xs[front])
        ax.plot(
            xs[front][order],
            wers[front][order],
            "-",
            color="black",
            alpha=0.5,
            zorder=0,
            drawstyle="steps-post" if sign > 0 else "steps-pre",
            label="Pareto front",
        )
        ax.scatter(xs[front], wers[front], s=160, facecolors="none", edgecolors="black", linewidths=1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"WER {hard} (%), 95% CI")
        ax.grid(alpha=0.3)
        ax.margins(x=0.18, y=0.12)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title("Accuracy vs size")
    axes[1].set_title("Accuracy vs speed")
    fig.tight_layout()
    for ax, xs, _, _ in axes_spec:
        _label_points(ax, [(x, w, s.label) for x, w, s in zip(xs, wers, done, strict=True) if not math.isnan(x)])
    caption = (
        f"Trade-offs on {hard}: WER (with 95% bootstrap CI) against size reduction and against RTF. Circled "
        "points, joined by the line, are the Pareto front (no other recipe is better on both axes)."
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


def _panel_title(base: str, noise: str) -> str:
    kind = dict(item.split("=", 1) for item in noise.split(",") if "=" in item).get("kind", "white")
    return f"{parse_dataset(base).label}, {kind} noise"


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
        ax.set_title(_panel_title(base, noise))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("WER (%)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    caption = (
        "WER against signal-to-noise ratio, one line per recipe (fp32 dashed); the right-most point is the clean audio."
    )
    return Plot("fig_wer_snr.png", caption, _png(fig))


# ---------------------------------------------------------------------------------------- document blocks


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FigureBlock:
    plot: Plot


Block = Heading | Para | Bullets | Table | FigureBlock


def format_p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def format_p(p: float) -> str:
    """`p = 0.25`, or `p < 0.001`."""
    value = format_p_value(p)
    return f"p {value}" if value.startswith("<") else f"p = {value}"


def format_wer(measure: Measure | None) -> str:
    if measure is None or not measure.wer_ci:
        return "-"
    ci = measure.wer_ci
    return f"{measure.wer:.2f} [{ci.low:.1f}, {ci.high:.1f}]"


def _num(value: float, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def main_table(systems: Sequence[System], layout: Layout) -> Table:
    labels = [parse_dataset(d).label for d in layout.clean]
    headers = ["Recipe", *(f"WER {x}" for x in labels), *(f"CER {x}" for x in labels)]
    headers += ["RTF", "Size red.", "Bits/weight (linear)", "Status"]
    rows = []
    for s in systems:
        measures = [s.measures.get(d) for d in layout.clean]
        bits = s.info.get("linear_bits_per_weight")
        rows.append(
            [
                s.label,
                *(format_wer(m) for m in measures),
                *(_num(m.cer if m else math.nan, ".2f") for m in measures),
                _num(s.rtf(layout.clean), ".3f"),
                _num(100 * s.size_reduction, ".0f") + ("%" if not math.isnan(s.size_reduction) else ""),
                _num(bits if bits is not None else math.nan, ".3g"),
                s.status,
            ]
        )
    counts = {parse_dataset(d).label: _utterance_count(systems, d) for d in layout.clean}
    notes = [
        "WER and CER in %, corpus-level (total errors / total reference words or characters), Whisper English "
        "normalizer; WER in brackets: 95% bootstrap CI, resampling utterances (10,000 resamples).",
        f"Utterances per dataset: {', '.join(f'{k} {v}' for k, v in counts.items())}.",
        f"RTF: compute seconds / audio seconds pooled over {', '.join(labels)} (the mean of the per-dataset RTFs "
        "weighted by audio duration); model loading and audio decoding excluded.",
        "Size red.: 1 - saved size / fp32 saved size. Bits/weight: mean stored bits per weight of the linear layers.",
    ]
    notes += [f"{s.label} ({s.status}): {s.error}" for s in systems if s.error]
    return Table(headers, rows, notes)


def _utterance_count(systems: Sequence[System], dataset: str) -> int:
    return max((len(s.measures[dataset].rows) for s in systems if dataset in s.measures), default=0)


def significance_table(comps: Sequence[Comparison]) -> Table:
    headers = ["Recipe", "Dataset", "WER diff. vs fp32", "95% CI", "p", "n", "Verdict"]
    rows = [
        [
            c.system.label,
            parse_dataset(c.dataset).label,
            f"{c.test.difference:+.2f}",
            f"[{c.test.low:+.2f}, {c.test.high:+.2f}]",
            format_p_value(c.test.p_value),
            str(c.test.n),
            c.verdict,
        ]
        for c in comps
    ]
    notes = [
        "WER difference in points (recipe minus fp32), utterances joined by id. p: two-sided paired permutation "
        "test (sign flips of per-utterance error differences, exact when few utterances differ). CI: paired "
        "bootstrap over utterances."
    ]
    return Table(headers, rows, notes)


def claims_paragraph(comps: Sequence[Comparison]) -> str:
    """Whether any measured improvement over fp32 is real: the paper's "Quanto int8 beats fp32" kind of claim."""
    lower = [c for c in comps if c.test.difference < 0]
    intro = (
        "The paper reports Quanto int8 beating fp32 on test-other. A claim that a recipe beats fp32 needs a WER "
        "that is lower and significantly so in a paired test."
    )
    if not lower:
        return f"{intro} No recipe measured a lower WER than fp32 on any dataset here."
    parts = [
        f"{c.system.label} on {parse_dataset(c.dataset).label} ({c.test.difference:+.2f} points, "
        f"{format_p(c.test.p_value)}: {'significant' if c.significant else 'not significant'})"
        for c in lower
    ]
    real = [c for c in lower if c.significant]
    verdict = (
        "The data supports an improvement only for: "
        + ", ".join(f"{c.system.label} on {parse_dataset(c.dataset).label}" for c in real)
        if real
        else "None is significant at 5%: this data does not support a claim that any recipe beats fp32"
    )
    return f"{intro} Lower WER than fp32 was measured for: {'; '.join(parts)}. {verdict}."


def snr_tables(systems: Sequence[System], layout: Layout, comps: Sequence[Comparison]) -> list[Block]:
    significant = {(c.system.label, c.dataset) for c in comps if c.significant}
    blocks: list[Block] = []
    for (base, noise), snrs in snr_panels(layout).items():
        specs = [snr_spec(layout, base, noise, snr) for snr in [*snrs, None]]
        headers = ["Recipe", *(f"{snr:g} dB" for snr in snrs), "clean"]
        rows = [
            [s.label, *(_num(s.wer(d), ".2f") + ("*" if (s.label, d) in significant else "") for d in specs)]
            for s in systems
        ]
        notes = ["*: significantly different from fp32 at 5% (paired test, as above); the test is in results.json."]
        blocks += [Para(f"WER (%) on {_panel_title(base, noise)} ({noise}):"), Table(headers, rows, notes)]
    return blocks


def setup_bullets(systems: Sequence[System]) -> list[str]:
    info = next((s.info for s in systems if s.info), {})
    items = [f"Models: {', '.join(dict.fromkeys(s.model for s in systems))}"]
    for key, name in (("device", "Device"), ("cpu", "CPU"), ("threads", "Threads"), ("batch_size", "Batch size")):
        if info.get(key) is not None:
            items.append(f"{name}: {info[key]}")
    versions = {k: v for k, v in (info.get("versions") or {}).items() if v}
    if versions:
        items.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    calib = next((s.info.get("calibration_dataset") for s in systems if s.info.get("calibration_dataset")), None)
    if calib:
        items.append(f"Calibration set (static recipes): {calib}")
    return items


def build_blocks(ctx: ReportData) -> list[Block]:
    blocks: list[Block] = [Heading(ctx.title, 1), Bullets(setup_bullets(ctx.systems))]
    blocks += [Heading("Results (Table 1 layout)"), main_table(ctx.systems, ctx.layout)]
    blocks += [Heading("Paired significance vs fp32")]
    if ctx.table_comparisons:
        blocks += [significance_table(ctx.table_comparisons), Para(claims_paragraph(ctx.table_comparisons))]
    else:
        blocks.append(Para("No paired test: it needs a completed fp32 baseline and a completed recipe per dataset."))
    blocks += [Heading("Deployment guidance")]
    for g in ctx.guidance:
        if len(ctx.guidance) > 1:
            blocks.append(Para(f"Model {g['model']}:"))
        blocks.append(Bullets(guidance_sentences(g, ctx.layout)))
    blocks.append(Para(_guidance_rules(ctx.layout)))
    blocks += [Heading("Figures")] + [FigureBlock(p) for p in ctx.plots]
    snr = snr_tables(ctx.systems, ctx.layout, ctx.comparisons)
    if snr:
        blocks += [Heading("WER vs SNR"), *snr]
    return blocks


def _guidance_rules(layout: Layout) -> str:
    hard = parse_dataset(layout.hard).label
    robust = (
        f"smallest WER increase {hard} - {parse_dataset(layout.easy).label}"
        if layout.easy
        else f"smallest WER increase vs fp32 on {hard}"
    )
    return (
        f"Rules: the reference dataset is {hard}; fastest = lowest RTF and smallest = highest size reduction among "
        f"completed recipes within the tolerance; most robust = {robust}; avoid = significantly worse than fp32 "
        "(paired test, 5%) on any dataset of the table, or Pareto-dominated on WER, size and RTF together."
    )


# -------------------------------------------------------------------------------------------------- render


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"{'#' * level} {text}")
            case Para(text):
                out.append(text)
            case Bullets(items):
                out.append("\n".join(f"- {item}" for item in items))
            case Table(headers, rows, notes):
                lines = [f"| {' | '.join(map(_md_cell, headers))} |", "|" + "---|" * len(headers)]
                lines += [f"| {' | '.join(map(_md_cell, row))} |" for row in rows]
                lines += [f"\n{i}. {note}" if i == 1 else f"{i}. {note}" for i, note in enumerate(notes, 1)]
                out.append("\n".join(lines))
            case FigureBlock(plot):
                out.append(f"![{plot.caption}]({plot.name})\n\n*{plot.caption}*")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then turn the only Markdown the blocks use (**bold**) into <strong>."""
    parts = html.escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; } figure { margin: 1.5em 0; } figcaption, ol { font-size: 0.85em; color: #555; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    out = []
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"<h{level}>{_inline_html(text)}</h{level}>")
            case Para(text):
                out.append(f"<p>{_inline_html(text)}</p>")
            case Bullets(items):
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in items) + "</ul>")
            case Table(headers, rows, notes):
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in headers)
                body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                foot = "<ol>" + "".join(f"<li>{_inline_html(n)}</li>" for n in notes) + "</ol>" if notes else ""
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}")
            case FigureBlock(plot):
                data = base64.b64encode(plot.png).decode("ascii")
                alt = html.escape(plot.caption)
                out.append(
                    f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{alt}</figcaption></figure>"
                )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def csv_text(systems: Sequence[System], layout: Layout) -> str:
    """Raw (unformatted) numbers, one row per (model, recipe), for spreadsheets and scripts."""
    labels = [parse_dataset(d).label for d in layout.clean]
    headers = ["model", "recipe", "status", "error"]
    headers += [h for x in labels for h in (f"wer_{x}", f"wer_{x}_low", f"wer_{x}_high", f"cer_{x}", f"n_{x}")]
    headers += ["rtf", "size_reduction", "linear_bits_per_weight"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for s in systems:
        cells: list[Any] = [s.model, s.recipe, s.status, s.error or ""]
        for d in layout.clean:
            m = s.measures.get(d)
            ci = m.wer_ci if m else None
            cells += [m.wer, ci.low, ci.high, m.cer, len(m.rows)] if m and ci else ["", "", "", "", 0]
        cells += [s.rtf(layout.clean), s.size_reduction, s.info.get("linear_bits_per_weight", "")]
        writer.writerow(["" if isinstance(c, float) and math.isnan(c) else c for c in cells])
    return buffer.getvalue()


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def system_dict(s: System, layout: Layout) -> dict[str, Any]:
    datasets = {}
    for spec, m in s.measures.items():
        ci = m.wer_ci
        datasets[spec] = {
            "status": m.status,
            "error": m.error,
            **m.stats,
            "wer_ci": [ci.low, ci.high] if ci else None,
        }
    return {
        "model": s.model,
        "recipe": s.recipe,
        "label": s.label,
        "baseline": s.baseline,
        "status": s.status,
        "error": s.error,
        "rtf": s.rtf(layout.clean),
        "size_reduction": s.size_reduction,
        "linear_bits_per_weight": s.info.get("linear_bits_per_weight"),
        "size_bytes": s.info.get("size_bytes"),
        "recipe_spec": s.spec,
        "datasets": datasets,
    }


# --------------------------------------------------------------------------------------------- entry point


@dataclass
class ReportData:
    systems: list[System]
    layout: Layout
    experiment: dict[str, Any]
    comparisons: list[Comparison]  # on every dataset, noisy ones included
    guidance: list[dict[str, Any]]
    plots: list[Plot]

    @property
    def table_comparisons(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.dataset in self.layout.clean]

    @property
    def title(self) -> str:
        name = self.experiment.get("name")
        return (
            f"Whisper post-training quantization report: {name}"
            if name
            else "Whisper post-training quantization report"
        )

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(
            {
                "experiment": self.experiment,
                "datasets": {"table": self.layout.clean, "reference": self.layout.hard, "easy": self.layout.easy},
                "rtf_pooled_over": self.layout.clean,
                "table": [system_dict(s, self.layout) for s in self.systems],
                "tests": [c.to_dict() for c in self.comparisons],
                "guidance": self.guidance,
                "figures": [p.name for p in self.plots],
            }
        )


def analyse(results: Iterable[dict[str, Any]], experiment: dict[str, Any] | None = None) -> ReportData:
    experiment = dict(experiment or {})
    systems = build_systems(results)
    if not systems:
        raise ValueError("no results to report")
    layout = Layout.of(systems)
    tolerance = float(experiment.get("tolerance", DEFAULT_TOLERANCE))
    comps = all_comparisons(systems, [*layout.clean, *(i.spec for i in layout.noisy)])
    # "Avoid" judges the table's datasets; the noisy variants have their own section.
    advice = guidance(systems, layout, [c for c in comps if c.dataset in layout.clean], tolerance)
    colors = _colors(systems)
    plots = [figure(systems, layout, colors) for figure in (figure_increase, figure_tradeoffs, figure_snr)]
    return ReportData(systems, layout, experiment, comps, advice, [p for p in plots if p])


def write_report(
    out_dir: Path | str, results: Iterable[dict[str, Any]], experiment: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the report files into out_dir and return the results.json content.

    Everything is rendered in memory first, then each file is written to a temp name and renamed over the
    old one, so a crash at any point leaves either the previous complete file or the new one, never a half.
    """
    data = analyse(results, experiment)
    blocks = build_blocks(data)
    summary = data.to_dict()
    files: dict[str, bytes] = {p.name: p.png for p in data.plots}
    files["table.csv"] = csv_text(data.systems, data.layout).encode()
    files["results.json"] = (json.dumps(summary, indent=2, default=str) + "\n").encode()
    files["report.md"] = render_markdown(blocks).encode()
    files["report.html"] = render_html(blocks, data.title).encode()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out, files)
    for stale in out.glob("fig_*.png"):  # figures of an earlier report that this one no longer has
        if stale.name not in files:
            stale.unlink()
    return summary


def _write_atomically(out: Path, files: dict[str, bytes]) -> None:
    temps = {name: out / f".{name}.tmp" for name in files}
    try:
        for name, data in files.items():
            with open(temps[name], "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for name, temp in temps.items():
            os.replace(temp, out / name)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
