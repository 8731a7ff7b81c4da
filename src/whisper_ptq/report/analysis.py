"""The study report's analysis: tasks grouped into systems (model x recipe), the datasets' roles and labels,
paired tests against the fp32 baseline, and the deployment guidance derived from those numbers with explicit
rules (a tolerance judged by the paired confidence interval, Pareto dominance, significance), never by hand.

Every number comes from the per-utterance rows, through the one place each is defined: WER, CER by
`results.rows.summarize`, RTF by `results.timing`, intervals, paired tests and sample sizes by `results.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from whisper_ptq.data.datasets import canonical_spec
from whisper_ptq.data.specs import parse_dataset_spec
from whisper_ptq.recipes import is_baseline
from whisper_ptq.report.tables import format_p
from whisper_ptq.results.rows import UtteranceResult, summarize
from whisper_ptq.results.stats import Interval, PairedTest, bootstrap_rate_ci, paired_rows_test
from whisper_ptq.results.timing import Speed, TimedPass, pooled_speeds, speedup, task_passes

DEFAULT_TOLERANCE = 1.0  # WER points above fp32 on the reference dataset that still count as "within tolerance"
ALPHA = 0.05
Z95 = 1.959963984540054  # two-sided 95% normal quantile, for intervals of sums of independent differences
STATUS_RANK = {"done": 0, "partial": 1, "skipped": 2, "failed": 3}  # a row is as bad as its worst task
PAIR = ("librispeech:test-clean", "librispeech:test-other")  # the paper's Figure 1: the increase from one to the other


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset spec split into its clean base and its noise level, if any (grammar: `data.specs`)."""

    spec: str
    base: str  # the spec without its noise modifier
    snr: float | None  # dB; None for a clean (non-noise) dataset
    noise: str  # the noise parameters other than snr (kind, seed): one WER-vs-SNR panel each
    label: str  # short name for tables and figures


def parse_dataset(spec: str, names: Mapping[str, str] | None = None) -> DatasetInfo:
    """`names`: labels the experiment gave its datasets, by clean spec (`DatasetSpec.clean`)."""
    parsed = parse_dataset_spec(spec)
    noise = ",".join(f"{k}={v}" for k, v in (parsed.noise or {}).items() if k != "snr")
    return DatasetInfo(spec, parsed.clean, parsed.snr, noise, parsed.labelled((names or {}).get(parsed.clean)))


@dataclass
class Measure:
    """One task: a (model, recipe) on one dataset."""

    dataset: str
    status: str
    error: str | None
    rows: list[UtteranceResult]
    stats: dict[str, float] = field(default_factory=dict)  # evaluate.summarize(rows); empty without rows
    wer_ci: Interval | None = None
    cer_ci: Interval | None = None
    passes: list[TimedPass] = field(default_factory=list)  # every timed pass, the accuracy pass first
    timing_error: str | None = None  # why a timing pass failed, if one did

    @classmethod
    def from_task(cls, task: dict[str, Any]) -> Measure:
        rows = [UtteranceResult(**u) for u in task.get("utterances") or []]
        summary = task.get("summary") or {}
        measure = cls(task["dataset"], task.get("status", "done"), task.get("error"), rows)
        measure.timing_error = summary.get("timing_error")
        if rows:
            measure.stats = _row_stats(summary, rows)
            measure.wer_ci = bootstrap_rate_ci([r.word_errors for r in rows], [r.ref_words for r in rows])
            measure.cer_ci = bootstrap_rate_ci([r.char_errors for r in rows], [r.ref_chars for r in rows])
            measure.passes = task_passes(rows, summary)
        return measure

    @property
    def wer(self) -> float:
        return self.stats.get("wer", math.nan)

    @property
    def cer(self) -> float:
        return self.stats.get("cer", math.nan)


SUMMARY_KEYS = (
    "n_utterances",
    "audio_seconds",
    "decoded_seconds",
    "wer",
    "cer",
    "rtf",
    "substitutions",
    "deletions",
    "insertions",
    "runaways",
    "long_utterances",
)


def _row_stats(summary: dict[str, Any], rows: list[UtteranceResult]) -> dict[str, float]:
    """summarize(rows), reusing the task summary when the store already computed it from these same rows:
    re-normalizing every transcript costs about a minute per full LibriSpeech sweep."""
    if all(k in summary for k in SUMMARY_KEYS) and summary["n_utterances"] == len(rows):
        return {k: summary[k] for k in SUMMARY_KEYS}
    return {k: v for k, v in summarize(rows).items() if k in SUMMARY_KEYS}


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

    @property
    def timing_error(self) -> str | None:
        return next((m.timing_error for m in self.measures.values() if m.timing_error), None)

    def wer(self, dataset: str) -> float:
        measure = self.measures.get(dataset)
        return measure.wer if measure else math.nan

    def speeds(self, datasets: Sequence[str]) -> dict[int, Speed]:
        """Batch size -> RTF over the timed passes, pooled over `datasets` (see `results.timing`)."""
        return pooled_speeds(self.measures[d].passes for d in datasets if d in self.measures and self.measures[d].stats)

    def speed(self, datasets: Sequence[str]) -> Speed | None:
        """The speed at the batch size the rows were transcribed at (the experiment's `batch_size`)."""
        speeds = self.speeds(datasets)
        return speeds.get(self.info.get("batch_size"), next(iter(speeds.values()), None))

    def rtf(self, datasets: Sequence[str]) -> float:
        speed = self.speed(datasets)
        return speed.median if speed else math.nan

    @property
    def size_bytes(self) -> float:
        return float(self.info.get("size_bytes", math.nan))

    @property
    def size_reduction(self) -> float:
        return float(self.info.get("size_reduction", 0.0 if self.baseline else math.nan))

    def relative_size(self, reference: str) -> float:
        """Saved size over the unquantized model's saved in `reference` (fp32 or fp16), minus 1."""
        base = self.info.get(f"{reference}_size_bytes")
        return self.size_bytes / base - 1.0 if base else math.nan


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
    """Which datasets play which role in the report, and their labels."""

    clean: list[str]  # non-noise datasets, experiment order: the table's WER/CER column pairs
    reference: str  # the dataset the tolerance, the trade-offs and the rankings are judged on
    reference_reason: str  # why that one: set by the experiment, or the default rule
    pair: tuple[str, str] | None  # (test-clean, test-other) when both are there: Figure 1 and robustness
    noisy: list[DatasetInfo]
    labels: dict[str, str]  # every dataset's label

    @classmethod
    def of(
        cls, systems: Sequence[System], names: Mapping[str, str] | None = None, reference: str | None = None
    ) -> Layout:
        """`names`: the experiment's labels by dataset as listed; `reference`: its `reference_dataset`."""
        specs = list(dict.fromkeys(d for s in systems for d in s.measures))
        clean_names = {parse_dataset_spec(canonical_spec(spec)).clean: label for spec, label in (names or {}).items()}
        infos = [parse_dataset(d, clean_names) for d in specs]
        labels = {i.spec: i.label for i in infos}
        clean = [i.spec for i in infos if i.snr is None] or specs[:1]
        by_base = {parse_dataset_spec(d).clean: d for d in clean}
        pair = (by_base[PAIR[0]], by_base[PAIR[1]]) if all(p in by_base for p in PAIR) else None
        chosen = next(
            (d for d in clean if reference is not None and reference in (labels[d], parse_dataset_spec(d).clean)),
            None,
        )
        if chosen:
            reason = "set by the experiment's `reference_dataset`"
        elif PAIR[1] in by_base:
            chosen, reason = by_base[PAIR[1]], "the default: test-other, the harder LibriSpeech test set"
        else:
            chosen, reason = clean[0], "the default without test-other: the first dataset listed"
        if reason.startswith("the default"):
            reason += "; `reference_dataset` chooses another"
        return cls(clean, chosen, reason, pair, [i for i in infos if i.snr is not None], labels)

    def label(self, spec: str) -> str:
        return self.labels.get(spec) or parse_dataset(spec).label


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
        needed = t.utterances_needed(t.difference)
        size = f"; about {needed:,} utterances would tell a difference of this size apart" if needed else ""
        return (
            f"not significantly different from fp32 at 5% ({format_p(t.p_value)}); "
            f"this sample cannot support a claim that {name} {claim}{size}"
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
            "utterances_needed": None if self.significant else t.utterances_needed(t.difference),
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


WITHIN, UNDECIDED, EXCEEDS = "within", "undecided", "exceeds"
UNQUANTIZED = ("fp32", "fp16", "bf16")  # Recipe.weights of the references and of unquantized conversions


@dataclass(frozen=True)
class ToleranceCheck:
    """Whether a recipe loses at most `tolerance` WER points against fp32, judged by the paired 95% bootstrap
    CI of the difference: within when the whole CI is at or below the tolerance, exceeds when the whole CI is
    above it (significantly worse than fp32 by more than the tolerance), undecided when the CI contains it."""

    comparison: Comparison
    tolerance: float

    @property
    def state(self) -> str:
        t = self.comparison.test
        return WITHIN if t.high <= self.tolerance else EXCEEDS if t.low > self.tolerance else UNDECIDED

    @property
    def utterances_needed(self) -> int | None:
        """For an undecided recipe: utterances that would tell whether it is within (80% power at 5%)."""
        t = self.comparison.test
        return t.utterances_needed(t.difference - self.tolerance) if self.state == UNDECIDED else None

    def to_dict(self) -> dict[str, Any]:
        t = self.comparison.test
        return {
            "recipe": self.comparison.system.recipe,
            "state": self.state,
            "wer_difference": t.difference,
            "ci_low": t.low,
            "ci_high": t.high,
            "n_utterances": t.n,
            "utterances_needed": self.utterances_needed,
        }


def guidance(systems: Sequence[System], layout: Layout, comps: Sequence[Comparison], tolerance: float) -> list[dict]:
    """Per model: the fastest and smallest recipes within tolerance, the most robust, and those to avoid."""
    return [
        _model_guidance(model, systems, layout, comps, tolerance) for model in dict.fromkeys(s.model for s in systems)
    ]


def _model_guidance(
    model: str, systems: Sequence[System], layout: Layout, comps: Sequence[Comparison], tol: float
) -> dict[str, Any]:
    ref = layout.reference
    mine = [s for s in systems if s.model == model and s.status == "done"]
    base = next((s for s in mine if s.baseline), None)
    out: dict[str, Any] = {"model": model, "reference_dataset": ref, "tolerance": tol}
    if base is None or math.isnan(base.wer(ref)):
        out["note"] = f"guidance needs a completed fp32 baseline for {model}; none was found"
        return out
    on_ref = {c.system.recipe: c for c in comps if c.dataset == ref and any(c.system is s for s in mine)}
    checks = [ToleranceCheck(on_ref[s.recipe], tol) for s in mine if s.recipe in on_ref]
    within = [c.comparison.system for c in checks if c.state != EXCEEDS]
    out["fp32"] = _numbers(base, base, layout, None)
    out["tolerance_checks"] = [c.to_dict() for c in checks]
    out["within_tolerance"] = [s.recipe for s in within]
    checked = {c.comparison.system.recipe: c for c in checks}
    # Winners are quantized (an unquantized conversion is a runtime, not a quantization) and not significantly
    # worse than fp32 on the reference dataset: such a recipe is one to avoid (`_avoid`), never also recommended.
    within = [
        s
        for s in within
        if s.spec.get("weights") not in UNQUANTIZED
        and not (on_ref[s.recipe].significant and on_ref[s.recipe].test.difference > 0)
    ]
    fastest = min(within, key=lambda s: _worst_if_nan(s.rtf(layout.clean)), default=None)
    smallest = min(within, key=lambda s: _worst_if_nan(s.size_bytes), default=None)
    out["fastest"] = _numbers(fastest, base, layout, checked[fastest.recipe]) if fastest else None
    if fastest and len(within) > 1:
        runner_up = min((s for s in within if s is not fastest), key=lambda s: _worst_if_nan(s.rtf(layout.clean)))
        out["fastest"]["runner_up"] = _speed_numbers(runner_up, base, layout)
    out["smallest"] = _numbers(smallest, base, layout, checked[smallest.recipe]) if smallest else None
    out["most_robust"] = _most_robust(mine, base, layout, comps, checked)
    out["avoid"] = _avoid(mine, comps, layout)
    return out


def _worst_if_nan(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _most_robust(
    mine: Sequence[System], base: System, layout: Layout, comps: Sequence[Comparison], checked: dict[str, Any]
) -> dict[str, Any] | None:
    """The smallest WER increase from test-clean to test-other (the paper's Figure 1), with the interval of
    its difference from fp32's increase; None unless both datasets are in the experiment."""
    if layout.pair is None:
        return None
    easy, hard = layout.pair
    ranked = [s for s in mine if not s.baseline and not math.isnan(s.wer(hard) - s.wer(easy))]
    robust = min(ranked, key=lambda s: s.wer(hard) - s.wer(easy), default=None)
    if robust is None:
        return None
    numbers = _numbers(robust, base, layout, checked.get(robust.recipe))
    tests = {c.dataset: c.test for c in comps if c.system is robust}
    if easy in tests and hard in tests:
        # The two datasets' utterances are independent samples: the variances of the paired differences add.
        se = math.hypot(tests[hard].se, tests[easy].se)
        diff = tests[hard].difference - tests[easy].difference
        numbers["increase_vs_fp32"] = {"difference": diff, "ci_low": diff - Z95 * se, "ci_high": diff + Z95 * se}
    return numbers


def _speed_numbers(system: System, base: System, layout: Layout) -> dict[str, Any]:
    speed, base_speed = system.speed(layout.clean), base.speed(layout.clean)
    return {
        "recipe": system.recipe,
        "rtf": speed.median if speed else math.nan,
        "rtf_low": speed.low if speed else math.nan,
        "rtf_high": speed.high if speed else math.nan,
        "passes": speed.passes if speed else 0,
        "speedup": speedup(base_speed, speed) if speed and base_speed else math.nan,
    }


def _numbers(system: System, base: System, layout: Layout, check: ToleranceCheck | None) -> dict[str, Any]:
    ref = layout.reference
    out = {
        **_speed_numbers(system, base, layout),
        "wer": system.wer(ref),
        "wer_vs_fp32": system.wer(ref) - base.wer(ref),
        "wer_increase": system.wer(layout.pair[1]) - system.wer(layout.pair[0]) if layout.pair else None,
        "size_bytes": system.size_bytes,
        "size_reduction": system.size_reduction,
        "size_vs_fp16": system.relative_size("fp16"),
    }
    if check is not None:
        out["tolerance_check"] = check.to_dict()
    return out


def _avoid(systems: Sequence[System], comps: Sequence[Comparison], layout: Layout) -> list[dict[str, Any]]:
    """Recipes significantly worse than fp32 on some dataset, or dominated on WER, size and RTF at once."""
    avoid = []
    for system in systems:
        if system.baseline:
            continue
        reasons = [
            f"significantly worse than fp32 on {layout.label(c.dataset)} "
            f"({c.test.difference:+.2f} WER points, {format_p(c.test.p_value)})"
            for c in comps
            if c.system is system and c.significant and c.test.difference > 0
        ]
        point = _objectives(system, layout)
        dominators = [o for o in systems if dominates(_objectives(o, layout), point)]
        if dominators:
            best = min(dominators, key=lambda o: o.wer(layout.reference))
            reasons.append(f"dominated by {best.recipe} ({_versus(best, system, layout)})")
        if reasons:
            avoid.append({"recipe": system.recipe, "reasons": reasons})
    return avoid


def _objectives(system: System, layout: Layout) -> np.ndarray:
    """(WER, size, RTF) as measured, all minimised; a missing number counts as worst."""
    point = np.array([system.wer(layout.reference), system.size_bytes, system.rtf(layout.clean)])
    return np.nan_to_num(point, nan=np.inf)


def _versus(a: System, b: System, layout: Layout) -> str:
    return (
        f"WER {a.wer(layout.reference):.2f} vs {b.wer(layout.reference):.2f}, size reduction {a.size_reduction:.0%} "
        f"vs {b.size_reduction:.0%}, RTF {a.rtf(layout.clean):.3f} vs {b.rtf(layout.clean):.3f}"
    )


def busy_timing(systems: Sequence[System], layout: Layout) -> str | None:
    """One sentence when some pass was timed while other work competed for the CPU (`TimedPass.busy`)."""
    hit = [(s, speed) for s in systems for speed in s.speeds(layout.clean).values() if speed.busy]
    if not hit:
        return None
    load = max(speed.load_average or 0.0 for _, speed in hit)
    passes = sum(speed.busy for _, speed in hit)
    total = sum(speed.passes for s in systems for speed in s.speeds(layout.clean).values())
    threads = next((speed.threads for _, speed in hit if speed.threads), None)
    cpus = next((speed.cpus for _, speed in hit if speed.cpus), None)
    names = ", ".join(dict.fromkeys(s.label for s, _ in hit))
    return (
        f"the machine was busy while timing: the load average reached {load:.1f} with {threads} "
        f"thread{'' if threads == 1 else 's'} in use on "
        f"{cpus} CPUs, in {passes} of {total} timed passes ({names}); other processes competed for the CPU, so "
        "those RTFs are inflated and their comparison is unreliable: time again on an idle machine"
    )
