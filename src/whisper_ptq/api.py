"""The public Python API: one verb per job, re-exported from `whisper_ptq`.

    import whisper_ptq

    q = whisper_ptq.quantize("tiny.en", "ct2-int8")           # a model name, hub id, folder or transformers model
    q.transcribe("clip.flac")                                  # a path, a 16 kHz array, or a list of either
    r = whisper_ptq.evaluate(q, "librispeech:test-clean", limit=5, data_root="../shared/data")
    r.wer, r.cer, r.rtf, r.size_bytes, r.rows                  # corpus WER/CER %, real-time factor, bytes, rows
    q.save("exports/tiny-ct2")                                 # then whisper_ptq.load("exports/tiny-ct2")
    whisper_ptq.bench("quick", out="runs/quick")               # a whole study, its database and report

Errors are `UserError`s that name the argument in library terms (`batch_size`, `recipe`); the command line
maps them to its flags.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.errors import UserError
from whisper_ptq.recipes import Recipe
from whisper_ptq.settings import DEFAULT_CALIBRATION, Settings

if TYPE_CHECKING:
    from whisper_ptq.data import Dataset
    from whisper_ptq.evaluation import EvalResult, Quantized


def quantize(
    model: Any,
    recipe: str | Recipe = "fp32",
    *,
    processor: Any = None,
    device: str = "cpu",
    threads: int | None = None,
    batch_size: int = 1,
    calibration: str = DEFAULT_CALIBRATION,
    calibration_limit: int = 32,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Quantized:
    """A Whisper model quantized by `recipe`, ready to transcribe and evaluate.

    `model`: a packaged name (`base`, `tiny.en`), a hub id, a local transformers or CTranslate2 folder, or a
    loaded transformers `WhisperForConditionalGeneration` (copied, never changed; `processor` defaults to
    the one saved beside it). `recipe`: a name from `whisper-ptq list`, a parametric form
    (`hqq:nbits=3,group_size=64`), a recipe file (.json) or a `Recipe`. Static recipes calibrate on
    `calibration` (a dataset spec under `data_root`).
    """
    from whisper_ptq.evaluation import Quantized

    settings = _settings(device, threads, batch_size, data_root, cache_dir, calibration, calibration_limit)
    return Quantized.build(_source(model, processor), _recipe(recipe), settings)


def load(export_dir: str | Path, *, device: str = "cpu", threads: int | None = None, batch_size: int = 1) -> Quantized:
    """A model saved by `Quantized.save` or `whisper-ptq export`, restored with its recipe."""
    from whisper_ptq.evaluation import Quantized

    return Quantized.from_export(Path(export_dir), _settings(device, threads, batch_size))


def evaluate(
    model: Any,
    dataset: str | Dataset,
    *,
    recipe: str | Recipe | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """WER, CER, RTF and size of a model on a dataset (a spec such as `librispeech:test-other`, the first
    `limit` utterances). `model` is a `Quantized` (then `recipe` must be None; `batch_size` defaults to the one
    it was made with) or anything `quantize` takes, quantized here with `recipe` (default fp32)."""
    from whisper_ptq.data import open_dataset
    from whisper_ptq.evaluation import Quantized

    if isinstance(dataset, str):
        dataset = open_dataset(dataset, data_root)
    dataset = dataset.limit(limit)
    settings = _settings(device, threads, batch_size or 1, data_root, cache_dir, progress=progress)
    if isinstance(model, Quantized):
        if recipe is not None:
            raise UserError(f"recipe: {model.recipe.name!r} already quantized this model; pass recipe=None")
        return model.evaluate(dataset, batch_size=batch_size, progress=progress)
    quantized = Quantized.build(_source(model, None), _recipe(recipe or "fp32"), settings, evaluated=[dataset])
    return quantized.evaluate(dataset, progress=progress)


@dataclass(frozen=True)
class BenchResult:
    out_dir: Path
    results: list[dict[str, Any]]  # one dict per (model, recipe, dataset) task: `results.store.Store.results`
    report: Path  # report.md; report.html, table.csv, results.json and the figures lie beside it
    jobs: int  # worker jobs this call started (0: the output dir already held every result)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] == "failed"]


def bench(
    experiment: str | Path = "paper",
    out: str | Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    limit: int | None = None,
    executor: str = "local",
    executor_options: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> BenchResult:
    """Run an experiment (a preset name or a .toml file) into `out` (default runs/<name>): a crash-safe results
    database that a second call resumes, and the report written from it."""
    from whisper_ptq.report import write_report
    from whisper_ptq.studies.bench import SweepOptions, run_sweep
    from whisper_ptq.studies.experiment import select_experiment

    chosen, out_dir = select_experiment(str(experiment), _path(out), resume, limit)
    options = SweepOptions(
        out_dir, _path(data_root), _path(cache_dir), executor, force, progress, executor_options or {}
    )
    sweep = run_sweep(chosen, options)
    write_report(out_dir, sweep.results, chosen.config())
    return BenchResult(out_dir, sweep.results, out_dir / "report.md", sweep.jobs)


# ---------------------------------------------------------------------------------------------- helpers


def _settings(
    device: str,
    threads: int | None,
    batch_size: int,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    calibration: str = DEFAULT_CALIBRATION,
    calibration_limit: int = 32,
    progress: bool = True,
) -> Settings:
    return Settings(
        device=device,
        batch_size=batch_size,
        threads=threads,
        data_root=_path(data_root),
        cache_dir=_path(cache_dir),
        calibration=calibration,
        calibration_limit=calibration_limit,
        progress=progress,
    )


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _recipe(recipe: str | Recipe) -> Recipe:
    from whisper_ptq.backends import get_recipe

    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise UserError(f"recipe: expected a recipe name, a parametric form or a Recipe, got {type(recipe).__name__}")
    return get_recipe(recipe)


def _source(model: Any, processor: Any) -> Any:
    """A model spec (str or path) as it is, or a loaded transformers model as a `WhisperBundle` of a copy."""
    if isinstance(model, str | Path):
        if processor is not None:
            raise UserError("processor: only a loaded model takes a processor; a model spec brings its own")
        return str(model)
    from whisper_ptq.models.loading import bundle_of

    return bundle_of(copy.deepcopy(model), processor)


__all__: Sequence[str] = ("BenchResult", "bench", "evaluate", "load", "quantize")
