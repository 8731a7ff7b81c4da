"""Exports: a folder a user ships. What the quantization library's own users load with that library's own call
(`Backend.save`, and `Backend.loaders` for the call), the config and processor files beside it that
transformers, faster-whisper and whisper-ptq read, a model card (README.md: source, recipe, sizes, measured
accuracy, versions, the load scripts) and `whisper_ptq_export.json`, from which `eval --model DIR` and
`whisper_ptq.load` restore the model with its recipe.

Layout, at the top of the folder: whatever the backend's `save` writes (a transformers model folder with its
`quantization_config`, a faster-whisper folder, quanto's safetensors + quantization map, a torch.save state
dict), then `config.json` and `generation_config.json` unless the backend wrote its own, `tokenizer.json`,
`tokenizer_config.json`, `preprocessor_config.json`, `README.md` and the marker.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends import backend_for, library_packages, recipe_from_dict
from whisper_ptq.backends.base import Loader
from whisper_ptq.errors import UserError
from whisper_ptq.files import atomic_dir
from whisper_ptq.models.sources import ModelSource
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.environment import environment

if TYPE_CHECKING:
    from whisper_ptq.evaluation import EvalResult, Quantized
    from whisper_ptq.models.loading import WhisperBundle

MARKER = "whisper_ptq_export.json"
CARD = "README.md"
FORMAT = 2  # 1: model/ (architecture) + weights/ (the backend's save), before exports were shippable
RUN = "Save a script as `transcribe.py` and run `python transcribe.py EXPORT_DIR clip.flac [more.flac ...]`: it "
RUN += "prints one transcript per clip."


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: str | Path) -> dict[str, Any]:
    marker = Path(path) / MARKER
    try:
        data = json.loads(marker.read_text())
        data["recipe"]  # noqa: B018 - every export has one
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{marker} is not a valid whisper-ptq export: {exc}") from None
    if data.get("format") != FORMAT:
        raise UserError(f"{path} was exported by an older whisper-ptq (model/ and weights/ folders): export it again")
    return data


def export_recipe(path: str | Path) -> Recipe:
    marker = Path(path) / MARKER
    data = read_marker(path)["recipe"]
    if not isinstance(data, dict):
        raise UserError(f"{marker} is not a valid whisper-ptq export: its recipe is not an object")
    return recipe_from_dict(data, f"the recipe of export {marker}")


def export_source(path: str | Path) -> dict[str, Any]:
    """The model an export was quantized from: its spec, kind and the SHA-256 of its unquantized weights."""
    return dict(read_marker(path)["source"])


def check_export_target(out_dir: Path, force: bool = False) -> None:
    """An export goes into a new or empty folder; `force` replaces an earlier export, never anything else."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"export folder {out_dir} is a file")
    if not any(out_dir.iterdir()):
        return
    if not is_export_dir(out_dir):
        raise UserError(f"export folder {out_dir} holds files that are not a whisper-ptq export: not replacing them")
    if not force:
        raise UserError(f"export folder {out_dir} holds an earlier export; set force to replace it", param="force")


def write_export(
    quantized: Quantized, out_dir: Path, *, force: bool = False, evaluate: Callable[[], EvalResult] | None = None
) -> None:
    """Write atomically: a failed export leaves `out_dir` as it was. `evaluate` runs after the model is saved
    (bitsandbytes cannot save a 4-bit model its CPU kernel has run) and before the card is written."""
    check_export_target(out_dir, force)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # empty: atomic_dir renames the finished export into its place
    earlier = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}") if out_dir.exists() else None
    bundle, recipe = quantized.bundle, quantized.recipe
    try:
        with atomic_dir(out_dir) as tmp:
            backend_for(recipe).save(quantized.built, tmp)
            write_model_files(bundle, tmp)
            result = evaluate() if evaluate else None
            marker = export_marker(quantized, result)
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            (tmp / CARD).write_text(model_card(quantized, marker, tmp))
            if earlier is not None:
                out_dir.rename(earlier)  # the last step: atomic_dir renames the new export into its place
    except BaseException:
        if earlier is not None and earlier.exists() and not out_dir.exists():
            earlier.rename(out_dir)
        raise
    if earlier is not None:
        shutil.rmtree(earlier)


def write_model_files(bundle: WhisperBundle, folder: Path) -> None:
    """What every loader reads beside the weights: the transformers architecture (unless the backend wrote its
    own config.json: a transformers one with its quantization_config, or CTranslate2's), the tokenizer and
    the feature extractor's preprocessor_config.json (faster-whisper reads it for the number of mel bins)."""
    if not (folder / "config.json").exists():
        config = bundle.model.config
        config.architectures = [type(bundle.model).__name__]
        config.save_pretrained(folder)
    if not (folder / "generation_config.json").exists():
        bundle.model.generation_config.save_pretrained(folder)
    bundle.processor.tokenizer.save_pretrained(folder)
    bundle.processor.feature_extractor.save_pretrained(folder)


def load_export_bundle(path: str | Path) -> WhisperBundle:
    """The exported architecture with freshly initialised weights, for the backend to overwrite."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from whisper_ptq.models.loading import WhisperBundle

    path = Path(path)
    marker = read_marker(path)
    model = WhisperForConditionalGeneration(WhisperConfig.from_dict(marker["transformers_config"])).eval()
    model.generation_config = GenerationConfig.from_dict(marker["generation_config"])
    processor = WhisperProcessor.from_pretrained(path)
    return WhisperBundle(model, processor, ModelSource(str(path), "export", path), hf_dir=None)


# -------------------------------------------------------------------------------------------- the marker


def export_marker(quantized: Quantized, result: EvalResult | None) -> dict[str, Any]:
    from whisper_ptq import __version__

    info, bundle, recipe = quantized.info, quantized.bundle, quantized.recipe
    loaders = loaders_of(quantized)
    packages = [*library_packages(), *(p for loader in loaders for p in loader.packages)]
    machine = environment(p for p in packages if p != "whisper-ptq")
    source = info.get("exported_from") or {
        "model": bundle.source.spec,
        "kind": bundle.source.kind,
        "sha256": info["source_sha256"],
    }
    evaluation = None
    if result is not None:
        figures = result.figures
        evaluation = {
            "dataset": result.dataset,
            **{key: figures[key] for key in ("n_utterances", "wer", "cer", "rtf")},
            **{key: info[key] for key in ("device", "threads")},
            "batch_size": result.info["batch_size"],
            "cpu": machine["cpu"],
        }
    return {
        "format": FORMAT,
        "whisper_ptq": __version__,
        "recipe": recipe.to_dict(),
        "source": source,
        "size": {key: info[key] for key in ("size_bytes", "fp32_size_bytes", "fp16_size_bytes", "size_reduction")},
        "evaluation": evaluation,
        "versions": {name: version for name, version in machine["versions"].items() if version is not None},
        "loaders": [loader.title for loader in loaders],
        "transformers_config": bundle.model.config.to_dict(),
        "generation_config": bundle.model.generation_config.to_dict(),
    }


def loaders_of(quantized: Quantized) -> list[Loader]:
    return backend_for(quantized.recipe).loaders(quantized.recipe, quantized.bundle.english_only)


# ---------------------------------------------------------------------------------------- the model card


def model_card(quantized: Quantized, marker: dict[str, Any], folder: Path) -> str:
    from whisper_ptq.report.tables import Table, markdown_table

    recipe, source, size = quantized.recipe, marker["source"], marker["size"]
    lines = [
        f"# {Path(source['model']).name} quantized with {recipe.name}",
        "",
        recipe.description,
        "",
        f"Quantized by whisper-ptq {marker['whisper_ptq']} from `{source['model']}` (a {source['kind']} model); "
        f"its unquantized weights have the SHA-256 `{source['sha256']}` (over names, dtypes, shapes and bytes).",
        "",
        "## Load it",
        "",
        RUN,
    ]
    for loader in loaders_of(quantized):
        exact = " (prints the transcripts whisper-ptq measured)" if loader.exact else ""
        lines += ["", f"### {loader.title}{exact}", ""]
        if loader.note:
            lines += [loader.note, ""]
        script = loader.script.rstrip("\n")
        lines += ["```bash", f"pip install {' '.join(loader.packages)}", "```", "", "```python", script, "```"]
    lines += [
        "",
        "whisper-ptq reloads the export with its recipe: `whisper_ptq.load(EXPORT_DIR)` in Python, or "
        "`whisper-ptq eval --model EXPORT_DIR --dataset DATASET`.",
        "",
        "## Size",
        "",
        "Bytes on disk of the weights as each one is saved; fp16 is how OpenAI ships Whisper.",
        "",
    ]
    fp32, fp16 = size["fp32_size_bytes"], size["fp16_size_bytes"]
    rows = [
        ["this export (the library's own save)", size["size_bytes"]],
        ["fp16 (transformers' save_pretrained)", fp16],
        ["fp32 (transformers' save_pretrained)", fp32],
    ]
    table = [[name, f"{n / 1e6:.1f}", f"{n / fp32:.1%}", f"{n / fp16:.1%}"] for name, n in rows]
    lines += markdown_table(Table(["weights", "MB", "of fp32", "of fp16"], table)).splitlines()
    lines += ["", "## Accuracy and speed", ""]
    evaluation = marker["evaluation"]
    if evaluation is None:
        lines.append(
            "Not measured at export time: `whisper-ptq export ... --evaluate DATASET` measures WER, CER and RTF."
        )
    else:
        lines += [
            f"Measured at export time on `{evaluation['dataset']}` ({evaluation['n_utterances']} utterances), "
            f"{evaluation['device']} ({evaluation['cpu']}), {evaluation['threads']} threads, batch "
            f"{evaluation['batch_size']}; WER and CER in % after Whisper's English text normalizer, RTF = "
            "transcription time / audio time.",
            "",
        ]
        figures = [[f"{evaluation['wer']:.2f}", f"{evaluation['cer']:.2f}", f"{evaluation['rtf']:.3f}"]]
        lines += markdown_table(Table(["WER", "CER", "RTF"], figures)).splitlines()
    lines += ["", "## Recipe", ""]
    lines += markdown_table(Table(["parameter", "value"], recipe_rows(marker["recipe"]))).splitlines()
    lines += ["", "## Library versions", ""]
    lines += markdown_table(
        Table(["package", "version"], [list(item) for item in marker["versions"].items()])
    ).splitlines()
    lines += ["", "## Files", ""]
    files = sorted(p for p in folder.rglob("*") if p.is_file()) + [folder / CARD]
    sizes = [[f"`{p.relative_to(folder)}`", str(p.stat().st_size) if p.exists() else "this file"] for p in files]
    lines += markdown_table(Table(["file", "bytes"], sizes)).splitlines()
    return "\n".join(lines) + "\n"


def recipe_rows(recipe: dict[str, Any]) -> list[list[str]]:
    """Every field of `Recipe.to_dict()`, options one per row."""
    rows = []
    for key, value in recipe.items():
        if key == "options":
            rows += [[f"options.{name}", _cell(option)] for name, option in value.items()]
        else:
            rows.append([key, _cell(value)])
    return rows


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)
