"""What can be refused before the model stack loads: a recipe this machine cannot run, a model spec that names
nothing, decoding options the model or the recipe's engine cannot honour (a language or task on an English-only
model, a beam on a greedy engine, audio over 30 s on an engine without long form), a calibration set that
overlaps the evaluated data. The command line calls it before it imports torch (so a bad input answers at
once), and `Quantized.build` calls it again for library users."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from whisper_ptq.backends import backend_for
from whisper_ptq.data import Dataset
from whisper_ptq.data.datasets import calibration_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.sources import english_only, resolve_model
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.rows import WINDOW_SECONDS
from whisper_ptq.settings import DecodingOptions, Settings

WARNED: set[tuple[str, str]] = set()  # (recipe, why it is slow) warned about in this process


def check_runnable(recipe: Recipe, device: str) -> None:
    """Refuse a recipe this machine cannot run; warn (stderr) about one its CPU runs slowly."""
    backend = backend_for(recipe)
    reason = backend.check(recipe, device)
    if reason:
        raise UserError(f"recipe {recipe.name!r} cannot run here: {reason}")
    slow = backend.slow_here(recipe, device)
    if slow and (recipe.name, slow) not in WARNED:  # the CLI checks before loading torch, Quantized.build again
        WARNED.add((recipe.name, slow))
        print(f"warning: recipe {recipe.name!r} is slow on this CPU: {slow}", file=sys.stderr)


def preflight(
    model: str | None, recipe: Recipe, settings: Settings, evaluated: Iterable[Dataset] = ()
) -> Dataset | None:
    """Raise a UserError for whatever cannot run; return the calibration set a static recipe needs. `model`:
    a model spec, or None for a model already loaded."""
    check_runnable(recipe, settings.device)
    evaluated = list(evaluated)
    check_decoding(recipe, settings.decoding, evaluated)
    if model is not None:
        only_english = english_only(resolve_model(model, settings.cache_dir))
        if only_english is not None:
            settings.decoding.check_model(only_english, model)
    return calibration_dataset(settings, evaluated) if recipe.needs_calibration else None


def check_decoding(recipe: Recipe, decoding: DecodingOptions, evaluated: Iterable[Dataset] = ()) -> None:
    """Refuse decoding the recipe's engine cannot do, naming what asks for it."""
    backend = backend_for(recipe)
    if decoding.beam_size > 1 and not backend.beam_search:
        raise UserError(
            f"recipe {recipe.name!r} decodes greedily only (the {backend.library} engine): beam_size "
            f"{decoding.beam_size} needs a transformers or CTranslate2 recipe",
            param="beam_size",
        )
    if backend.long_form:
        return
    for dataset in evaluated:
        for utt in dataset.utterances:
            if (seconds := utt.duration()) > WINDOW_SECONDS:
                raise UserError(
                    f"recipe {recipe.name!r} cannot transcribe audio longer than {WINDOW_SECONDS:g} s: utterance "
                    f"{utt.id} of {dataset.spec} lasts {seconds:.1f} s"
                )
