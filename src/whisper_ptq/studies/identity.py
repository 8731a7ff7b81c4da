"""What a stored run is computed from besides its recipe, compared by the results database before it reuses a
task's rows (`Store.ensure_task`). One flat dict: a new setting that changes hypotheses is one more key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from whisper_ptq.backends import backend_for
from whisper_ptq.data import Dataset
from whisper_ptq.models.sources import model_fingerprint, resolve_model
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.environment import code_sha256, library_versions
from whisper_ptq.settings import Settings


def model_content(model: str, cache_dir: Path | None) -> str | None:
    """The fingerprint of the files `model` loads from (None for a hub id: see `model_fingerprint`)."""
    return model_fingerprint(resolve_model(model, cache_dir))


def run_identity(model: str | None, recipe: Recipe, dataset: Dataset, settings: Settings) -> dict[str, Any]:
    """`model`: `model_content` of the run's model. The data is identified by where it was read from (the same
    spec under another data root, or a relative manifest path from another folder, is other data); each row
    also carries the fingerprint of its own audio and text (`Dataset.fingerprint`). The code is whisper-ptq's
    that makes a transcript and the versions of the libraries the recipe runs on: rows computed before a fix
    (or an upgrade) are other results, not to be mixed with today's."""
    return {
        "model": model,
        "data": str(dataset.root.resolve()),
        "device": settings.device,
        "code": code_sha256(),
        "versions": library_versions(backend_for(recipe).requires.values()),
    }
