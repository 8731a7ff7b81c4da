"""Mixed-precision search: one format per layer group, minimising WER on a search dataset under a size budget,
then verified on test datasets that the search never sees.

Formats are HQQ recipes (8/4/3/2-bit weight-only groups; `FORMATS`): HQQ quantizes every Linear including the
LM head, needs no calibration data (so nothing of the test sets can leak in), stores packed integers that its
save path writes as such (so sizes are real bytes), keeps each layer's bit width in the layer itself (so one
model can mix them), and runs on CPU. Each (group, format) cell is a one-entry mixed plan (`backends/mixed`),
so a quantized head is re-tied to the token embedding: without that, the fp32 embedding would stay beside the
quantized head and no budget under ~0.40 of whisper-base could be met.

The search measures every cell once on the search dataset: WER/CER increase over fp32, and bytes saved, from
the size the library's save path writes for the model with only that group quantized. It then picks one
format per group by dynamic programming (a multiple-choice knapsack: least summed WER increase, then CER,
then the fewest bytes saved, subject to the summed savings covering the budget). A measured decrease counts
as no change: quantizing a group does not improve a model, and a negative cell on a small search set is
noise that would otherwise buy a lower precision for nothing (the first search here chose int4 for three
groups on -0.38 points, one word of 30 clips, and lost to uniform int8 on the test set). That assumes the
groups' effects add up; the chosen mix is therefore measured again as a whole, on the search set (size and
WER) and on the test sets beside fp32 and each uniform format, with paired tests: the comparison the result
must win.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whisper_ptq.backends import get_recipe
from whisper_ptq.backends.base import target_linears
from whisper_ptq.backends.mixed import PlanEntry, all_linears, mixed_recipe
from whisper_ptq.data import Dataset
from whisper_ptq.errors import UserError
from whisper_ptq.files import atomic_write_files
from whisper_ptq.recipes import Recipe, save_recipe_file
from whisper_ptq.report.tables import Table, csv_text, markdown_table
from whisper_ptq.results.stats import paired_rows_test
from whisper_ptq.results.store import RESULTS_FILE, Store
from whisper_ptq.settings import Settings
from whisper_ptq.studies.groups import Group, groups
from whisper_ptq.studies.runner import Measurement, Run, Runner, preload

# format -> the HQQ recipe it stands for (None: left fp32). keep=none: the head is quantized like any layer.
FORMATS: dict[str, str | None] = {
    "fp32": None,
    "int8": "hqq:nbits=8,group_size=64,keep=none",
    "int4": "hqq:nbits=4,group_size=64,keep=none",
    "int3": "hqq:nbits=3,group_size=64,keep=none",
    "int2": "hqq:nbits=2,group_size=32,keep=none",  # 2 bits needs the smallest groups (see hqq-int2)
}
SEARCH_LEVELS = ("coarse", "fine")
DP_RESOLUTION = 4000  # steps of the savings axis; savings are rounded down to them, never up


def parse_formats(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = next((name for name in names if name not in FORMATS), None)
    if unknown is not None:
        raise UserError(f"unknown format {unknown!r}; choose from {', '.join(FORMATS)}")
    if not any(FORMATS[name] for name in names):
        raise UserError(f"formats {text!r} hold no quantized format; choose from {', '.join(FORMATS)}")
    return names


@dataclass(frozen=True)
class SearchSpec:
    model: str
    budget: float  # the largest size allowed, as a fraction of the fp32 model's saved bytes
    formats: tuple[str, ...]
    search: Dataset  # limit applied
    tests: tuple[Dataset, ...]
    level: str = "coarse"

    def __post_init__(self) -> None:
        if not 0 < self.budget <= 1:
            raise UserError(f"budget {self.budget:g} is not in (0, 1]: it is a fraction of the fp32 size")
        if self.level not in SEARCH_LEVELS:
            raise UserError(f"level {self.level!r} is not one of {', '.join(SEARCH_LEVELS)}")
        if not self.tests:
            raise UserError("give at least one test dataset: the search's result is judged there")
        seen = {u.audio_path.resolve() for u in self.search.utterances}
        for test in self.tests:
            if test.spec == self.search.spec or seen & {u.audio_path.resolve() for u in test.utterances}:
                raise UserError(
                    f"test dataset {test.spec!r} shares audio with the search dataset {self.search.spec!r}: "
                    "the search must never see the test data"
                )

    def config(self) -> dict[str, Any]:
        """The results database's identity: the model and search set only, so searches with other budgets,
        formats or limits reuse every cell already measured."""
        return {"kind": "search", "model": self.model, "search": self.search.spec}


@dataclass(frozen=True)
class Cell:
    """One group in one format, measured alone on the search set."""

    group: Group
    format: str
    wer_increase: float
    cer_increase: float
    saved_bytes: int


@dataclass(frozen=True)
class SearchResult:
    spec: SearchSpec
    recipe: Recipe
    recipe_file: Path
    cells: list[Cell]
    chosen: list[Cell]
    fp32_search: Measurement
    mix_search: Measurement
    tests: list[Measurement]  # per test dataset: fp32, the mix, each uniform format

    @property
    def predicted_size_fraction(self) -> float:
        fp32 = self.fp32_search.size_bytes
        return (fp32 - sum(c.saved_bytes for c in self.chosen)) / fp32

    @property
    def predicted_wer(self) -> float:
        return self.fp32_search.wer + sum(max(0.0, c.wer_increase) for c in self.chosen)  # as choose() counts

    @property
    def within_budget(self) -> bool:
        return self.mix_search.size_bytes <= self.spec.budget * self.mix_search.fp32_size_bytes


# ---------------------------------------------------------------------------------------------- recipes


def cell_recipe(group: Group, fmt: str) -> Recipe:
    return mixed_recipe(f"{fmt}@{group.name}", [PlanEntry(group.name, group.patterns, get_recipe(FORMATS[fmt]))])


def uniform_recipe(fmt: str, every: Sequence[Group]) -> Recipe:
    """Every group, the head included, in one format: the single-format model a mix must beat."""
    patterns = tuple(p for group in every for p in group.patterns)
    return mixed_recipe(f"uniform-{fmt}", [PlanEntry("all", patterns, get_recipe(FORMATS[fmt]))])


def mix_recipe(name: str, chosen: Sequence[Cell]) -> Recipe:
    """The chosen plan (fp32 groups left out); all fp32 is simply the fp32 recipe."""
    entries = [
        PlanEntry(c.group.name, c.group.patterns, get_recipe(FORMATS[c.format])) for c in chosen if FORMATS[c.format]
    ]
    if not entries:
        return get_recipe("fp32")
    return mixed_recipe(name, entries, "; ".join(f"{c.group.name}={c.format}" for c in chosen))


# ---------------------------------------------------------------------------------------------- choosing


def choose(cells: Iterable[Cell], need_bytes: int) -> list[Cell]:
    """One cell per group (in first-seen group order) with the least summed (WER, CER) increase, negative
    increases counted as zero, then the fewest bytes saved (the most precision the budget leaves), whose
    savings sum to at least `need_bytes`: a multiple-choice knapsack solved by dynamic programming over the
    savings, counted in steps rounded down, so a plan accepted here saves at least what the steps say."""
    by_group: dict[str, list[Cell]] = {}
    for cell in cells:
        by_group.setdefault(cell.group.name, []).append(cell)
    step = max(1, math.ceil(need_bytes / DP_RESOLUTION))
    target = max(0, math.ceil(need_bytes / step))
    # savings reached (capped at the target) -> ((summed increases, bytes saved), cells chosen so far)
    best: dict[int, tuple[tuple[float, float, int], list[Cell]]] = {0: ((0.0, 0.0, 0), [])}
    for options in by_group.values():
        reached: dict[int, tuple[tuple[float, float, int], list[Cell]]] = {}
        for saved, ((wer, cer, saved_bytes), picked) in best.items():
            for cell in options:
                key = min(target, saved + cell.saved_bytes // step)
                cost = (
                    wer + max(0.0, cell.wer_increase),
                    cer + max(0.0, cell.cer_increase),
                    saved_bytes + cell.saved_bytes,
                )
                if key not in reached or cost < reached[key][0]:
                    reached[key] = (cost, [*picked, cell])
        best = reached
    if target not in best:
        most = sum(max(c.saved_bytes for c in options) for options in by_group.values())
        raise UserError(
            f"no mix of these formats saves {need_bytes / 1e6:.1f} MB; the most any saves is {most / 1e6:.1f} MB"
        )
    return best[target][1]


# ---------------------------------------------------------------------------------------------- running


def run_search(spec: SearchSpec, settings: Settings, out_dir: Path, force: bool = False) -> SearchResult:
    from whisper_ptq.models.loading import load_model  # the model stack, once the inputs are known good

    bundle = load_model(spec.model, settings.cache_dir)  # once, for the groups and module names
    searched = groups(bundle.model.config, spec.level)
    every = groups(bundle.model.config, "coarse")
    linears = all_linears(bundle.model)
    quantized = [fmt for fmt in spec.formats if FORMATS[fmt]]
    cell_runs = {(group, fmt): _cell_run(bundle.model, group, fmt) for group in searched for fmt in quantized}
    del bundle
    search_set = preload(spec.search)
    out_dir.mkdir(parents=True, exist_ok=True)
    with Store.for_experiment(
        out_dir / RESULTS_FILE, f"search-{spec.model}", settings.decoding.identify(spec.config()), force
    ) as store:
        runner = Runner(store, spec.model, settings, linears)
        fp32 = runner.measure(Run("fp32", get_recipe("fp32")), search_set)
        cells = [_cell(group, fmt, runner.measure(run, search_set), fp32) for (group, fmt), run in cell_runs.items()]
        if "fp32" in spec.formats:
            cells += [Cell(group, "fp32", 0.0, 0.0, 0) for group in searched]
        need = math.ceil(fp32.size_bytes * (1 - spec.budget))
        chosen = choose(cells, need)
        name = f"mix-{spec.model}-b{spec.budget:g}"
        recipe = mix_recipe(name, chosen)
        recipe_file = out_dir / f"{name}.json"
        save_recipe_file(recipe, recipe_file)
        # An earlier search into this database may have chosen another mix under the same name.
        mix = runner.measure(Run(recipe.name, recipe), search_set, replace_changed=True)
        compared = [get_recipe("fp32"), recipe, *(uniform_recipe(fmt, every) for fmt in quantized)]
        tests = [
            runner.measure(Run(r.name, r), data, replace_changed=r is recipe)
            for data in map(preload, spec.tests)
            for r in compared
        ]
    return SearchResult(spec, recipe, recipe_file, cells, chosen, fp32, mix, tests)


def _cell_run(model: Any, group: Group, fmt: str) -> Run:
    recipe = cell_recipe(group, fmt)
    entry = PlanEntry(group.name, group.patterns, get_recipe(FORMATS[fmt]))
    return Run(recipe.name, recipe, group, frozenset(target_linears(model, entry.restricted(), lm_head=True)))


def _cell(group: Group, fmt: str, m: Measurement, fp32: Measurement) -> Cell:
    return Cell(group, fmt, m.wer - fp32.wer, m.cer - fp32.cer, m.fp32_size_bytes - m.size_bytes)


# ---------------------------------------------------------------------------------------------- report


def write_search_report(result: SearchResult, out_dir: Path) -> Path:
    """search-<model>-b<budget>.md (cells, plan, prediction vs measurement, test comparison) and .csv (the
    test measurements); returns the Markdown file."""
    # Not Path.with_suffix: the budget's decimal point would be taken for a suffix (b0.4 -> b0.md).
    stem = f"search-{result.spec.model}-b{result.spec.budget:g}"
    atomic_write_files(out_dir, {f"{stem}.csv": _csv(result.tests), f"{stem}.md": _markdown(result)})
    return out_dir / f"{stem}.md"


def _markdown(r: SearchResult) -> str:
    spec = r.spec
    mb = r.fp32_search.size_bytes / 1e6
    lines = [
        f"# Mixed-precision search: {spec.model}, budget {spec.budget:g} of the fp32 size ({mb:.1f} MB)",
        "",
        f"Search set {spec.search.spec} (n={r.fp32_search.n_utterances}), fp32 WER {r.fp32_search.wer:.2f}%. "
        f"Formats: {', '.join(f'{f} ({FORMATS[f]})' if FORMATS[f] else f for f in spec.formats)}.",
        "",
        "## Each group alone: WER increase on the search set (points) / MB saved",
        "",
        *_cell_table(r.cells, spec.formats),
        "",
        "## Chosen",
        "",
        *_table(["group", "format"], [[c.group.name, c.format] for c in r.chosen]),
        "",
        f"Recipe `{r.recipe.name}`, file `{r.recipe_file.name}`. Size / fp32: predicted "
        f"{r.predicted_size_fraction:.3f}, measured {r.mix_search.size_fraction:.3f} "
        f"({'within' if r.within_budget else 'OVER'} the budget {spec.budget:g}). Search-set WER: predicted "
        f"{r.predicted_wer:.2f}% (fp32 + the sum of the groups' increases, decreases counted as none), measured "
        f"{r.mix_search.wer:.2f}%.",
        "",
        "## Test datasets (never searched on)",
        "",
        *_table(
            ["recipe", "dataset", "n", "size / fp32", "WER %", "CER %"],
            [
                [m.run.label, m.dataset, m.n_utterances, f"{m.size_fraction:.3f}", f"{m.wer:.2f}", f"{m.cer:.2f}"]
                for m in r.tests
            ],
        ),
        "",
        *(_verdict(r, dataset) for dataset in dict.fromkeys(m.dataset for m in r.tests)),
    ]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    return markdown_table(Table(header, [[str(cell) for cell in row] for row in rows])).split("\n")


def _cell_table(cells: Sequence[Cell], formats: Sequence[str]) -> list[str]:
    quantized = [f for f in formats if FORMATS[f]]
    found = {(c.group.name, c.format): c for c in cells}
    names = list(dict.fromkeys(c.group.name for c in cells))
    rows = [
        [name, *(f"{found[name, f].wer_increase:+.2f} / {found[name, f].saved_bytes / 1e6:.1f}" for f in quantized)]
        for name in names
    ]
    return _table(["group", *quantized], rows)


def _verdict(r: SearchResult, dataset: str) -> str:
    """Whether the mix beats, on this dataset, every uniform recipe no bigger than it (the acceptance test),
    and whether each difference is more than noise (paired test over the utterances)."""
    here = [m for m in r.tests if m.dataset == dataset]
    mix = next(m for m in here if m.run.recipe == r.recipe)
    rivals = [m for m in here if m.run.label.startswith("uniform-") and m.size_bytes <= mix.size_bytes]
    if not rivals:
        return f"- {dataset}: no uniform format is as small as the mix ({mix.size_fraction:.3f}); nothing to beat."
    listed = ", ".join(f"{m.run.label} {m.wer:.2f}% at {m.size_fraction:.3f}{_paired(m, mix)}" for m in rivals)
    won = all(mix.wer < m.wer for m in rivals)
    return (
        f"- {dataset}: mix {mix.wer:.2f}% at {mix.size_fraction:.3f} vs uniform recipes of the same or smaller "
        f"size: {listed}. Lower than every one of them: {'yes' if won else 'no'}."
    )


def _paired(rival: Measurement, mix: Measurement) -> str:
    test = paired_rows_test(rival.rows, mix.rows)
    if test is None:
        return ""
    return f" (mix {test.difference:+.2f} points, 95% CI [{test.low:+.2f}, {test.high:+.2f}], p = {test.p_value:.3g})"


def _csv(tests: Sequence[Measurement]) -> str:
    headers = ["recipe", "dataset", "n_utterances", "size_bytes", "size_fraction", "wer", "cer"]
    rows = [[m.run.label, m.dataset, m.n_utterances, m.size_bytes, m.size_fraction, m.wer, m.cer] for m in tests]
    return csv_text(headers, rows)
