"""What can be refused before the model stack loads: a recipe this machine cannot run, a model spec that names
nothing, a calibration set that overlaps the evaluated data. The command line calls it before it imports
torch (so a bad input answers at once), and `Quantized.build` calls it again for library users."""

from __future__ import annotations

from collections.abc import Iterable

from whisper_ptq.backends import backend_for
from whisper_ptq.data import Dataset
from whisper_ptq.data.datasets import calibration_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.sources import resolve_model
from whisper_ptq.recipes import Recipe
from whisper_ptq.settings import Settings


def check_runnable(recipe: Recipe, device: str) -> None:
    reason = backend_for(recipe).check(recipe, device)
    if reason:
        raise UserError(f"recipe {recipe.name!r} cannot run here: {reason}")


def preflight(
    model: str | None, recipe: Recipe, settings: Settings, evaluated: Iterable[Dataset] = ()
) -> Dataset | None:
    """Raise a UserError for whatever cannot run; return the calibration set a static recipe needs. `model`:
    a model spec, or None for a model already loaded."""
    check_runnable(recipe, settings.device)
    if model is not None:
        resolve_model(model, settings.cache_dir)
    return calibration_dataset(settings, evaluated) if recipe.needs_calibration else None
