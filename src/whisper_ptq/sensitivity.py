"""Layer-wise sensitivity: quantize one group of Linear layers at a time with a recipe, everything else fp32,
and measure what each group costs in WER and CER against the fp32 model.

Groups come at two levels. Coarse: encoder self-attention (q/k/v/out), encoder MLP (fc1/fc2), decoder
self-attention, decoder cross-attention (`encoder_attn`), decoder MLP, and the LM head `proj_out` (tied to
the token embedding; a recipe that keeps it fp32 has nothing to quantize there). Fine: each layer index of
each of those components, and the head. Each level covers every Linear exactly once. A group is the recipe
restricted with `Recipe.modules` to the group's regexes, so its results are stored like any run: one task
per (restricted recipe, dataset) in the results database, which also makes an interrupted study resume.

`Runner` (shared with `search`) evaluates runs into that database: each run reloads the small fp32 model
(Session.open), the audio is decoded once for all runs (`preload`), and a group run is refused when the
backend quantized anything outside its group (a library that ignores `Recipe.modules`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from whisper_ptq.backends.base import target_linears
from whisper_ptq.backends.mixed import all_linears, quantized_linears
from whisper_ptq.data import Dataset, Utterance
from whisper_ptq.errors import UserError
from whisper_ptq.evaluate import Session, Settings, UtteranceResult, environment, summarize
from whisper_ptq.executors.worker import one_line
from whisper_ptq.models import load_model
from whisper_ptq.recipes import Recipe, get_recipe
from whisper_ptq.store import Store
from whisper_ptq.sweep import RESULTS_FILE

LEVELS = ("coarse", "fine", "both")
QUANTIZED_KEY = "group_quantized_modules"  # task info: how many of its group's modules a run quantized
HEAD = "proj_out"
ENCODER_PREFIX = "model.encoder."
# component -> (stack, regex of its Linears inside one layer of that stack)
COMPONENTS: dict[str, tuple[str, str]] = {
    "encoder.attn": ("encoder", r"self_attn\.(q|k|v|out)_proj"),
    "encoder.mlp": ("encoder", r"fc[12]"),
    "decoder.self_attn": ("decoder", r"self_attn\.(q|k|v|out)_proj"),
    "decoder.cross_attn": ("decoder", r"encoder_attn\.(q|k|v|out)_proj"),
    "decoder.mlp": ("decoder", r"fc[12]"),
}


# ---------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Group:
    """Linear layers quantized together: a component in every layer (coarse), in one layer (fine), or the head."""

    name: str  # "encoder.attn", "encoder.attn.3", "proj_out"
    component: str
    layer: int | None  # None: all layers of the component, or the head
    patterns: tuple[str, ...]  # regexes of module names, as in Recipe.modules

    @property
    def level(self) -> str:
        return "coarse" if self.layer is None else "fine"


HEAD_GROUP = Group(HEAD, HEAD, None, (rf"^{HEAD}$",))


def _component_group(component: str, layer: int | None) -> Group:
    stack, inner = COMPONENTS[component]
    index = r"\d+" if layer is None else str(layer)
    name = component if layer is None else f"{component}.{layer}"
    return Group(name, component, layer, (rf"^model\.{stack}\.layers\.{index}\.{inner}$",))


def groups(config: Any, level: str) -> list[Group]:
    """The groups of a level for a Whisper config (its layer counts); `both` lists coarse then fine, and the
    head, a single module, once."""
    if level not in LEVELS:
        raise UserError(f"level {level!r} is not one of {', '.join(LEVELS)}")
    layers = {"encoder": config.encoder_layers, "decoder": config.decoder_layers}
    coarse = [_component_group(c, None) for c in COMPONENTS]
    fine = [_component_group(c, i) for c, (stack, _) in COMPONENTS.items() for i in range(layers[stack])]
    chosen = {"coarse": coarse, "fine": fine, "both": coarse + fine}[level]
    return [*chosen, HEAD_GROUP]


def restrict(recipe: Recipe, group: Group) -> Recipe:
    """The recipe quantizing only the group's modules (its name says which, so each is its own task)."""
    return replace(recipe, name=f"{recipe.name}@{group.name}", modules=group.patterns)


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class PreloadedDataset(Dataset):
    """A dataset whose audio (decoded, resampled, noise mixed in) is computed once for all runs."""

    audio: dict[str, np.ndarray] | None = None

    def load_audio(self, utt: Utterance) -> np.ndarray:
        return self.audio[utt.id]


def preload(dataset: Dataset) -> PreloadedDataset:
    values = {f.name: getattr(dataset, f.name) for f in fields(Dataset)}
    return PreloadedDataset(**values, audio={u.id: dataset.load_audio(u) for u in dataset.utterances})


@dataclass(frozen=True)
class Run:
    """One model configuration to evaluate. `expected`: the Linear names it may quantize, checked after
    quantizing (None: not checked, e.g. the full recipe)."""

    label: str
    recipe: Recipe
    group: Group | None = None
    expected: frozenset[str] | None = None

    @property
    def keeps_encoder_fp32(self) -> bool:
        """Whether the encoder stays exactly the fp32 one (so its outputs can be shared between runs)."""
        if self.expected is None:
            return self.recipe.scheme == "reference" and self.recipe.weights == "fp32"
        return not any(name.startswith(ENCODER_PREFIX) for name in self.expected)


class EncoderOutputs:
    """fp32 encoder outputs by input features, shared by every run that leaves the encoder fp32: the fp32 run
    and each decoder-side group. Whisper's encoder sees 30 s of padded audio whatever the utterance, so it is
    most of the work on CPU; reusing its output is exact, since the same fp32 weights see the same features.
    (Those runs' RTF then excludes the encoder, and their task info says so.)"""

    def __init__(self) -> None:
        self.outputs: dict[bytes, Any] = {}

    def share_(self, model: Any) -> None:
        encoder = model.get_encoder()
        compute = encoder.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            features = kwargs["input_features"] if "input_features" in kwargs else args[0]
            key = hashlib.blake2b(features.detach().cpu().numpy().tobytes(), digest_size=16).digest()
            if key not in self.outputs:
                self.outputs[key] = compute(*args, **kwargs)
            cached = self.outputs[key]
            return type(cached)(**cached)  # a fresh container: generate may rebind its fields

        encoder.forward = forward  # on this instance only


@dataclass(frozen=True)
class Measurement:
    run: Run
    dataset: str
    n_utterances: int
    wer: float
    cer: float
    size_bytes: int
    fp32_size_bytes: int
    quantized_modules: int | None  # of the run's expected modules, how many the library quantized
    rows: tuple[UtteranceResult, ...] = field(default=(), compare=False, repr=False)  # for paired tests

    @property
    def size_fraction(self) -> float:
        return self.size_bytes / self.fp32_size_bytes


class Runner:
    """Evaluates runs of one model on datasets into a results database, skipping what it already holds."""

    def __init__(self, store: Store, model: str, settings: Settings, linears: Sequence[str]):
        """`linears`: every Linear name of the fp32 model (`mixed.all_linears`), to check group runs."""
        self.store, self.model, self.settings, self.linears = store, model, settings, list(linears)
        self.environment_id = store.record_environment({**environment(), "argv": sys.argv})
        self.position = 0
        self.encoder_outputs = EncoderOutputs()

    def measure(self, run: Run, dataset: Dataset, replace_changed: bool = False) -> Measurement:
        """The run's figures over exactly `dataset`'s utterances (the task may hold more, from a run with a
        larger limit into the same database). `replace_changed`: see `Store.ensure_task`."""
        task_id = self.store.ensure_task(self.position, self.model, run.recipe, dataset.spec, replace_changed)
        self.position += 1
        ids = {u.id for u in dataset.utterances}
        stored = self.store.done_ids(task_id)
        if ids - stored:
            self._evaluate(run, dataset, task_id, stored)
        rows = [row for row in self.store.rows(task_id) if row.id in ids]
        info = self._info(run.recipe, dataset.spec)
        figures = summarize(rows)
        return Measurement(
            run,
            dataset.spec,
            len(rows),
            figures["wer"],
            figures["cer"],
            info["size_bytes"],
            info["fp32_size_bytes"],
            info.get(QUANTIZED_KEY),
            tuple(rows),
        )

    def _evaluate(self, run: Run, dataset: Dataset, task_id: int, stored: set[str]) -> None:
        self.store.set_status(task_id, "running", environment_id=self.environment_id)
        try:
            session = Session.open(self.model, run.recipe, self.settings, evaluated=[dataset])
            info = {**session.info, **self._check_quantized(run, session)}
            if run.keeps_encoder_fp32:
                self.encoder_outputs.share_(session.quantized.model)
                info["encoder_outputs"] = "shared with the other runs whose encoder is fp32: RTF excludes the encoder"
            self.store.merge_info(task_id, info)
            session.evaluate(
                dataset,
                self.settings.batch_size,
                done=stored,
                on_rows=lambda rows: self.store.add_rows(task_id, rows, self.environment_id),
                progress=self.settings.progress,
            )
        except BaseException as exc:
            self.store.set_status(task_id, "failed", one_line(exc))
            raise
        self.store.set_status(task_id, "done")

    def _check_quantized(self, run: Run, session: Session) -> dict[str, int]:
        """Refuse a run that quantized outside its modules; count those it did quantize (a library may skip
        some it was given, e.g. a head it never quantizes: that group then reads as fp32 and says so)."""
        if run.expected is None:
            return {}
        quantized = quantized_linears(session.quantized.model, self.linears)
        stray = quantized - run.expected
        if stray:
            raise UserError(
                f"recipe {run.recipe.name!r} also quantized {min(stray)}: library {run.recipe.library} ignores "
                "Recipe.modules, so it cannot be restricted to one group"
            )
        return {QUANTIZED_KEY: len(quantized)}

    def _info(self, recipe: Recipe, dataset: str) -> dict[str, Any]:
        return next(
            r["summary"]
            for r in self.store.results()
            if (r["model"], r["recipe"], r["dataset"]) == (self.model, recipe.name, dataset)
        )


# ---------------------------------------------------------------------------------------------- the study


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
    bundle = load_model(study.model, settings.cache_dir)  # once, for the group definitions and module names
    runs, skipped = plan_runs(study, bundle.model)
    linears = all_linears(bundle.model)
    del bundle
    dataset = preload(study.dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"sensitivity-{study.model}-{study.recipe.name}"
    with Store.for_experiment(out_dir / RESULTS_FILE, name, study.config(), force) as store:
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


HEADER = ["group", "level", "modules", "WER %", "CER %", "ΔWER", "ΔCER", "share of full ΔWER %", "size / fp32"]


def markdown(rows: Sequence[SensitivityRow], skipped: Sequence[tuple[str, str]], title: str) -> str:
    lines = [f"# Sensitivity: {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    worst = sorted((r for r in rows if r.level == "coarse"), key=lambda r: r.wer_increase, reverse=True)
    if worst:
        ranked = ", ".join(f"{r.label} ({r.wer_increase:+.2f})" for r in worst)
        lines += ["", f"Coarse groups by WER increase (points over fp32): {ranked}."]
    lines += [f"- {group}: not run, {why}" for group, why in skipped]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[SensitivityRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([f.name for f in fields(SensitivityRow)])
    writer.writerows([getattr(row, f.name) for f in fields(SensitivityRow)] for row in rows)
    return buffer.getvalue()


def heatmap_png(rows: Sequence[SensitivityRow], title: str) -> bytes | None:
    """Layer index x component, colour = WER increase over fp32; the top row holds the coarse groups
    (all layers at once) and the head. Blank: not measured."""
    cells = [r for r in rows if r.level in ("coarse", "fine")]
    if not cells:
        return None
    columns = [*COMPONENTS, HEAD]
    layers: list[int | None] = sorted({r.layer for r in cells} - {None})
    if any(r.layer is None for r in cells):
        layers.insert(0, None)
    grid = np.full((len(layers), len(columns)), np.nan)
    for r in cells:
        grid[layers.index(r.layer), columns.index(r.component)] = r.wer_increase
    fig = Figure(figsize=(1.6 * len(columns) + 1.5, 0.45 * len(layers) + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    spread = max(1e-6, float(np.nanmax(np.abs(grid))))  # symmetric: red costs WER, blue (noise) gains
    image = ax.imshow(grid, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -spread, spread), aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            color = "white" if abs(value) > 0.6 * spread else "black"  # readable on the darkest cells
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), ["all layers" if i is None else f"layer {i}" for i in layers])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="WER increase over fp32 (points)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    return buffer.getvalue()


def write_tables(
    out_dir: Path, stem: str, rows: Sequence[SensitivityRow], skipped: Sequence[tuple[str, str]], title: str
) -> list[Path]:
    files = {f"{stem}.md": markdown(rows, skipped, title).encode(), f"{stem}.csv": csv_text(rows).encode()}
    png = heatmap_png(rows, title)
    if png:
        files[f"{stem}.png"] = png
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    return [out_dir / name for name in files]
