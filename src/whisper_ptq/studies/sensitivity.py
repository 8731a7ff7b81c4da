"""Layer-wise sensitivity: quantize one group of Linear layers at a time with a recipe, everything else fp32,
and measure what each group costs in WER and CER against the fp32 model.

Groups (`groups`) come at two levels, coarse components and single layers; the LM head `proj_out` is tied
to the token embedding, so a recipe that keeps it fp32 has nothing to quantize there. A group is the recipe
restricted with `Recipe.modules` to the group's regexes, so its results are stored like any run: one task
per (restricted recipe, dataset) in the results database (`runner`), which also makes an interrupted study
resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from whisper_ptq.backends import get_recipe
from whisper_ptq.backends.base import target_linears
from whisper_ptq.backends.mixed import all_linears
from whisper_ptq.data import Dataset
from whisper_ptq.errors import UserError
from whisper_ptq.files import atomic_write_files
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import Recipe
from whisper_ptq.report.figures import heatmap_png
from whisper_ptq.report.tables import Table, csv_text, markdown_table
from whisper_ptq.results.store import RESULTS_FILE, Store
from whisper_ptq.settings import Settings
from whisper_ptq.studies.groups import COMPONENTS, groups, restrict
from whisper_ptq.studies.runner import Measurement, Run, Runner, preload


@dataclass(frozen=True)
class Study:
    """A sensitivity study: one recipe, group by group, on one dataset (limit already applied)."""

    model: str
    recipe: Recipe
    dataset: Dataset
    level: str = "coarse"

    def config(self) -> dict[str, Any]:
        """The results database's identity: neither the level nor the limit, so a coarse study and a fine one
        on fewer utterances share one database (and the fp32 and full-recipe tasks)."""
        recipe, dataset = self.recipe.to_dict(), self.dataset.spec
        return {"kind": "sensitivity", "model": self.model, "recipe": recipe, "dataset": dataset}


@dataclass(frozen=True)
class SensitivityRow:
    label: str
    level: str  # baseline, full, coarse or fine
    component: str
    layer: int | None
    modules: int | None  # Linear layers quantized (None: the whole recipe or none)
    wer: float
    cer: float
    wer_increase: float  # points over fp32
    cer_increase: float
    size_fraction: float  # saved bytes over the fp32 model's
    share: float | None  # percent of the full recipe's WER increase


@dataclass(frozen=True)
class SensitivityResult:
    rows: list[SensitivityRow]
    skipped: list[tuple[str, str]]  # (group, why it was not run)
    n_utterances: int
    files: list[Path]


def check_restrictable(recipe: Recipe) -> None:
    if recipe.scheme == "reference":
        raise UserError(f"recipe {recipe.name!r} quantizes nothing: choose a quantization recipe")
    if recipe.modules:
        raise UserError(f"recipe {recipe.name!r} already selects modules: sensitivity restricts it group by group")


def plan_runs(study: Study, model: Any) -> tuple[list[Run], list[tuple[str, str]]]:
    """fp32, the full recipe, then one run per group; a group the recipe keeps whole (e.g. the head of a
    recipe that keeps it fp32) is skipped, with the reason."""
    runs = [Run("fp32", get_recipe("fp32")), Run(f"{study.recipe.name} (all groups)", study.recipe)]
    skipped = []
    for group in groups(model.config, study.level):
        recipe = restrict(study.recipe, group)
        names = frozenset(target_linears(model, recipe, lm_head=True))
        if names:
            runs.append(Run(group.name, recipe, group, names))
        else:
            skipped.append((group.name, f"{study.recipe.name} keeps all of its modules in full precision"))
    return runs, skipped


def run_sensitivity(study: Study, settings: Settings, out_dir: Path, force: bool = False) -> SensitivityResult:
    check_restrictable(study.recipe)
    from whisper_ptq.models.loading import load_model  # the model stack, once the inputs are known good

    bundle = load_model(study.model, settings.cache_dir)  # once, for the group definitions and module names
    runs, skipped = plan_runs(study, bundle.model)
    linears = all_linears(bundle.model)
    del bundle
    dataset = preload(study.dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"sensitivity-{study.model}-{study.recipe.name}"
    with Store.for_experiment(out_dir / RESULTS_FILE, name, settings.decoding.identify(study.config()), force) as store:
        runner = Runner(store, study.model, settings, linears)
        measurements = [runner.measure(run, dataset) for run in runs]
    rows = table_rows(measurements)
    title = f"{study.model} {study.recipe.name} on {study.dataset.spec} (n={len(dataset.utterances)})"
    files = write_tables(out_dir, f"sensitivity_{study.level}", rows, skipped, title)
    return SensitivityResult(rows, skipped, len(dataset.utterances), files)


def table_rows(measurements: Sequence[Measurement]) -> list[SensitivityRow]:
    """Rows relative to the first measurement (fp32); shares relative to the second (the full recipe)."""
    base, full = measurements[0], measurements[1]
    full_increase = full.wer - base.wer
    rows = []
    for i, m in enumerate(measurements):
        group = m.run.group
        increase = m.wer - base.wer
        rows.append(
            SensitivityRow(
                label=m.run.label,
                level=group.level if group else ("baseline", "full")[i],
                component=group.component if group else "",
                layer=group.layer if group else None,
                modules=m.quantized_modules,
                wer=m.wer,
                cer=m.cer,
                wer_increase=increase,
                cer_increase=m.cer - base.cer,
                size_fraction=m.size_fraction,
                share=100 * increase / full_increase if group and full_increase > 0 else None,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------- outputs


# ---------------------------------------------------------------------------------------------- outputs

HEADER = ["group", "level", "modules", "WER %", "CER %", "ΔWER", "ΔCER", "share of full ΔWER %", "size / fp32"]


def _fmt(value: float | int | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _cells(row: SensitivityRow) -> list[str]:
    return [
        row.label,
        row.level,
        _fmt(row.modules, "d"),
        f"{row.wer:.2f}",
        f"{row.cer:.2f}",
        f"{row.wer_increase:+.2f}",
        f"{row.cer_increase:+.2f}",
        _fmt(row.share, ".0f"),
        f"{row.size_fraction:.3f}",
    ]


def markdown(rows: Sequence[SensitivityRow], skipped: Sequence[tuple[str, str]], title: str) -> str:
    lines = [f"# Sensitivity: {title}", "", markdown_table(Table(HEADER, [_cells(row) for row in rows]))]
    worst = sorted((r for r in rows if r.level == "coarse"), key=lambda r: r.wer_increase, reverse=True)
    if worst:
        ranked = ", ".join(f"{r.label} ({r.wer_increase:+.2f})" for r in worst)
        lines += ["", f"Coarse groups by WER increase (points over fp32): {ranked}."]
    lines += [f"- {group}: not run, {why}" for group, why in skipped]
    return "\n".join(lines) + "\n"


def write_tables(
    out_dir: Path, stem: str, rows: Sequence[SensitivityRow], skipped: Sequence[tuple[str, str]], title: str
) -> list[Path]:
    columns = [f.name for f in fields(SensitivityRow)]
    files = {
        f"{stem}.md": markdown(rows, skipped, title),
        f"{stem}.csv": csv_text(columns, ([getattr(row, c) for c in columns] for row in rows)),
    }
    # Layer index x component, colour = WER increase over fp32; the top row holds the coarse groups (all layers
    # at once) and the head.
    cells = [(r.layer, r.component, r.wer_increase) for r in rows if r.level in ("coarse", "fine")]
    png = heatmap_png(cells, [*COMPONENTS, HEAD], title, "WER increase over fp32 (points)")
    if png:
        files[f"{stem}.png"] = png
    atomic_write_files(out_dir, files)
    return [out_dir / name for name in files]
