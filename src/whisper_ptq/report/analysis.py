"""The study report's analysis: tasks grouped into systems (model x recipe), the datasets' roles, paired tests
against the fp32 baseline, and the deployment guidance derived from those numbers with explicit rules
(tolerance, Pareto dominance, significance), never written by hand.

Every number comes from the per-utterance rows, through the one place each is defined: WER, CER and RTF by
`results.rows.summarize`, intervals and paired tests by `results.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from whisper_ptq.data.specs import parse_dataset_spec
from whisper_ptq.recipes import is_baseline
from whisper_ptq.report.tables import format_p
from whisper_ptq.results.rows import UtteranceResult, summarize
from whisper_ptq.results.stats import Interval, PairedTest, bootstrap_rate_ci, paired_rows_test

DEFAULT_TOLERANCE = 1.0  # WER points above fp32 on the reference dataset that still count as "within tolerance"
ALPHA = 0.05
STATUS_RANK = {"done": 0, "partial": 1, "skipped": 2, "failed": 3}  # a row is as bad as its worst task


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset spec split into its clean base and its noise level, if any (grammar: `data.specs`)."""

    spec: str
    base: str  # the spec without its noise modifier
    snr: float | None  # dB; None for a clean (non-noise) dataset
    noise: str  # the noise parameters other than snr (kind, seed): one WER-vs-SNR panel each
    label: str  # short name for tables and figures


def parse_dataset(spec: str) -> DatasetInfo:
    parsed = parse_dataset_spec(spec)
    noise = ",".join(f"{k}={v}" for k, v in (parsed.noise or {}).items() if k != "snr")
    return DatasetInfo(spec, parsed.clean, parsed.snr, noise, parsed.label)


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
        return self.recipe == "fp32" or is_baseline(self.spec)

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

    @property
    def size_vs_fp16(self) -> float:
        """Saved size over the fp16 model's (what users download from OpenAI); NaN for runs that predate it."""
        size, fp16 = self.info.get("size_bytes"), self.info.get("fp16_size_bytes")
        return size / fp16 if size and fp16 else math.nan


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
