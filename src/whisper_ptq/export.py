"""Exported quantized models: a directory that `eval --model DIR` loads back with its recipe.

Layout: `whisper_ptq_export.json` (recipe and source model), `model/` (config, generation config and
processor: the architecture, no weights), `weights/` (what the library's own save path wrote).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from whisper_ptq.backends import Built, backend_for, recipe_from_dict
from whisper_ptq.errors import UserError
from whisper_ptq.files import atomic_dir
from whisper_ptq.models.sources import ModelSource
from whisper_ptq.recipes import Recipe

if TYPE_CHECKING:
    from whisper_ptq.models.loading import WhisperBundle

MARKER = "whisper_ptq_export.json"


def is_export_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def export_recipe(path: str | Path) -> Recipe:
    marker = Path(path) / MARKER
    try:
        data = json.loads(marker.read_text())["recipe"]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{marker} is not a valid whisper-ptq export: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{marker} is not a valid whisper-ptq export: its recipe is not an object")
    return recipe_from_dict(data, f"the recipe of export {marker}")


def check_export_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"export target {out_dir} exists and is not an empty directory")


def write_export(bundle: WhisperBundle, recipe: Recipe, quantized: Built, out_dir: Path) -> None:
    """Write atomically: a failed export leaves nothing at `out_dir`."""
    check_export_target(out_dir)
    if out_dir.exists():
        out_dir.rmdir()  # empty: atomic_dir renames the finished export into its place
    with atomic_dir(out_dir) as tmp:
        bundle.model.config.save_pretrained(tmp / "model")
        bundle.model.generation_config.save_pretrained(tmp / "model")
        bundle.processor.save_pretrained(tmp / "model")
        backend_for(recipe).save(quantized, tmp / "weights")
        marker = {"recipe": recipe.to_dict(), "source_model": bundle.source.spec}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def load_export_bundle(path: str | Path) -> WhisperBundle:
    """The exported architecture with freshly initialised weights, for the backend to overwrite."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from whisper_ptq.models.loading import WhisperBundle

    path = Path(path)
    config = WhisperConfig.from_pretrained(path / "model")
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig.from_pretrained(path / "model")
    processor = WhisperProcessor.from_pretrained(path / "model")
    return WhisperBundle(model, processor, ModelSource(str(path), "export", path), hf_dir=None)
