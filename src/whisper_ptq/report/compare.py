"""`whisper-ptq compare RUN_A RUN_B`: two runs on the same utterances, side by side. A run is an `eval` output
folder (summary.json + utterances.jsonl) or a recipe of a bench folder (`DIR:RECIPE`, or `DIR:MODEL/RECIPE`
when the folder holds several models). For each dataset both have: WER and CER with 95% bootstrap CIs, the
paired test of B against A, and every utterance whose normalized hypotheses differ, with the normalized
reference and both hypotheses. Light: no model library is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from whisper_ptq.data.specs import dataset_label
from whisper_ptq.errors import UserError
from whisper_ptq.report.tables import format_p
from whisper_ptq.results.metrics import normalize
from whisper_ptq.results.outputs import is_output_dir, read_outputs
from whisper_ptq.results.rows import UtteranceResult
from whisper_ptq.results.stats import Interval, PairedTest, bootstrap_rate_ci, paired_rows_test
from whisper_ptq.results.store import RESULTS_FILE, Store


@dataclass(frozen=True)
class Run:
    name: str  # as given on the command line
    title: str  # model and recipe
    datasets: dict[str, list[UtteranceResult]]  # spec -> rows


def open_run(text: str) -> Run:
    path = Path(text)
    if is_output_dir(path):
        summary, rows = read_outputs(path)
        return Run(text, f"{summary.get('model')} {summary.get('recipe')}", {summary["dataset"]: rows})
    # DIR:RECIPE; a recipe name may hold colons itself (hqq:nbits=3), so the folder is the first prefix that is one.
    for i, char in enumerate(text):
        if char == ":" and (Path(text[:i]) / RESULTS_FILE).is_file():
            return _bench_run(Path(text[:i]), text[i + 1 :], text)
    if (path / RESULTS_FILE).is_file():
        raise UserError(f"{text} is a bench folder: name one of its recipes as {text}:RECIPE")
    raise UserError(
        f"{text}: neither an eval output folder (summary.json and utterances.jsonl) nor a bench folder's recipe "
        "(DIR:RECIPE)"
    )


def _bench_run(folder: Path, name: str, text: str) -> Run:
    with Store.open(folder / RESULTS_FILE) as store:
        results = store.results()
    tasks = [t for t in results if name in (t["recipe"], f"{t['model']}/{t['recipe']}")]
    if not tasks:
        held = ", ".join(dict.fromkeys(f"{t['model']}/{t['recipe']}" for t in results))
        raise UserError(f"{folder} holds no recipe {name!r}; it holds (MODEL/RECIPE): {held}")
    models = list(dict.fromkeys(t["model"] for t in tasks))
    if len(models) > 1:
        raise UserError(f"{folder} holds {name!r} for several models ({', '.join(models)}): name one as MODEL/{name}")
    datasets = {t["dataset"]: [UtteranceResult(**u) for u in t["utterances"]] for t in tasks if t["utterances"]}
    return Run(text, f"{models[0]} {tasks[0]['recipe']}", datasets)


@dataclass(frozen=True)
class Pair:
    """One utterance as both runs transcribed it."""

    a: UtteranceResult
    b: UtteranceResult

    @property
    def differs(self) -> bool:
        return normalize(self.a.hypothesis) != normalize(self.b.hypothesis)


@dataclass(frozen=True)
class DatasetComparison:
    dataset: str
    pairs: list[Pair]
    only_a: int  # utterances only one run has: not compared
    only_b: int
    wer: tuple[Interval, Interval]
    cer: tuple[Interval, Interval]
    test: PairedTest


def compare_runs(a: Run, b: Run, dataset: str | None = None) -> list[DatasetComparison]:
    """Every dataset both runs have (or only `dataset`, a spec or a label), utterances matched by id."""
    common = [d for d in a.datasets if d in b.datasets and dataset in (None, d, dataset_label(d))]
    if not common:
        wanted = f" {dataset!r}" if dataset else ""
        raise UserError(
            f"{a.name} and {b.name} share no dataset{wanted}: A has {', '.join(a.datasets) or 'none'}; "
            f"B has {', '.join(b.datasets) or 'none'}"
        )
    return [_compare_dataset(d, a.datasets[d], b.datasets[d]) for d in common]


def _compare_dataset(dataset: str, rows_a: list[UtteranceResult], rows_b: list[UtteranceResult]) -> DatasetComparison:
    by_id = {r.id: r for r in rows_b}
    pairs = [Pair(r, by_id[r.id]) for r in rows_a if r.id in by_id]
    if not pairs:
        raise UserError(f"on {dataset} the two runs share no utterance id: they transcribed different utterances")
    mismatch = next((p.a.id for p in pairs if normalize(p.a.reference) != normalize(p.b.reference)), None)
    if mismatch is not None:
        raise UserError(f"utterance {mismatch!r} of {dataset} has different references in the two runs")
    a, b = [p.a for p in pairs], [p.b for p in pairs]
    test = paired_rows_test(a, b)
    assert test is not None  # pairs is not empty

    def rate(rows: list[UtteranceResult], unit: str) -> Interval:
        errors = [getattr(r, f"{unit}_errors") for r in rows]
        return bootstrap_rate_ci(errors, [getattr(r, f"ref_{unit}s") for r in rows])

    return DatasetComparison(
        dataset,
        pairs,
        len(rows_a) - len(pairs),
        len(rows_b) - len(pairs),
        (rate(a, "word"), rate(b, "word")),
        (rate(a, "char"), rate(b, "char")),
        test,
    )


def format_comparison(a: Run, b: Run, comparisons: list[DatasetComparison]) -> str:
    lines = [f"A: {a.name} ({a.title})", f"B: {b.name} ({b.title})"]
    for c in comparisons:
        lines += ["", *_dataset_lines(c)]
    return "\n".join(lines)


def _dataset_lines(c: DatasetComparison) -> list[str]:
    t = c.test
    words = sum(p.a.ref_words for p in c.pairs)
    lines = [f"{dataset_label(c.dataset)} ({c.dataset}): {len(c.pairs)} utterances in common, {words} reference words"]
    if c.only_a or c.only_b:
        lines.append(f"  not compared: {c.only_a} utterances only in A, {c.only_b} only in B")
    for name, wer, cer in (("A", c.wer[0], c.cer[0]), ("B", c.wer[1], c.cer[1])):
        lines.append(
            f"  {name}: WER {wer.estimate:.2f}% [95% CI {wer.low:.2f}, {wer.high:.2f}]  "
            f"CER {cer.estimate:.2f}% [95% CI {cer.low:.2f}, {cer.high:.2f}]"
        )
    verdict = (
        f"significant at 5%: B is {'worse' if t.difference > 0 else 'better'} than A"
        if t.significant()
        else "not significant at 5%: this sample cannot tell A and B apart"
    )
    needed = None if t.significant() else t.utterances_needed(t.difference)
    if needed:
        verdict += f"; about {needed:,} utterances would tell a difference of this size apart (80% power at 5%)"
    lines.append(
        f"  B - A: {t.difference:+.2f} WER points, paired 95% CI [{t.low:+.2f}, {t.high:+.2f}], "
        f"{format_p(t.p_value)} (paired permutation test; {t.changed} of {t.n} utterances differ in errors): {verdict}"
    )
    differing = sorted((p for p in c.pairs if p.differs), key=lambda p: (p.a.word_errors - p.b.word_errors, p.a.id))
    lines.append(f"  utterances whose normalized hypotheses differ: {len(differing)}")
    for p in differing:
        lines += [
            f"  {p.a.id}: word errors A {p.a.word_errors}, B {p.b.word_errors} (of {p.a.ref_words})",
            f"    reference: {normalize(p.a.reference)}",
            f"    A:         {normalize(p.a.hypothesis)}",
            f"    B:         {normalize(p.b.hypothesis)}",
        ]
    return lines
