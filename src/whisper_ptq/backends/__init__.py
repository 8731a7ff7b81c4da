"""Registry of quantization backends, and recipe lookup: adding a library means one module here and one line
below. Backend modules import their libraries (and torch) only inside the methods that run a model, so this
registry, recipe validation and `whisper-ptq list` never load the model stack."""

from __future__ import annotations

import importlib
import os
from functools import cache
from pathlib import Path

from whisper_ptq.backends.base import Backend, BuildContext, Built
from whisper_ptq.backends.bnb import BitsAndBytesBackend
from whisper_ptq.backends.ctranslate2 import CTranslate2Backend
from whisper_ptq.backends.fastcpu import FastCPUBackend, fast_cpu_here
from whisper_ptq.backends.hqq import HQQBackend
from whisper_ptq.backends.mixed import MixedBackend
from whisper_ptq.backends.onnxruntime import OnnxRuntimeBackend
from whisper_ptq.backends.openvino import OpenVINOBackend
from whisper_ptq.backends.pytorch import PyTorchBackend
from whisper_ptq.backends.quanto import QuantoBackend
from whisper_ptq.backends.reference import ReferenceBackend
from whisper_ptq.backends.torchao import TorchaoBackend
from whisper_ptq.backends.whispercpp import WhisperCppBackend
from whisper_ptq.errors import UserError
from whisper_ptq.recipes import Recipe, parse_params, read_recipe_file

BACKENDS: dict[str, Backend] = {
    backend.library: backend
    for backend in (
        ReferenceBackend(),
        PyTorchBackend(),
        TorchaoBackend(),
        BitsAndBytesBackend(),
        CTranslate2Backend(),
        QuantoBackend(),
        HQQBackend(),
        MixedBackend(),
        FastCPUBackend(),
        OnnxRuntimeBackend(),
        OpenVINOBackend(),
        WhisperCppBackend(),
    )
}


@cache
def named_recipes() -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    for backend in BACKENDS.values():
        recipes.update(backend.named_recipes())
    recipes["fast-cpu"] = fast_cpu_here(recipes)  # the fastest recipe on this CPU's class
    return recipes


def backend_for(recipe: Recipe) -> Backend:
    if recipe.library not in BACKENDS:
        choices = ", ".join(BACKENDS)
        raise UserError(f"recipe {recipe.name!r}: unknown library {recipe.library!r}; choose from {choices}")
    return BACKENDS[recipe.library]


def get_recipe(text: str) -> Recipe:
    """Resolve a named recipe, a parametric `lib:key=value,...` form, or a saved recipe file (.json)."""
    named = named_recipes()
    if text in named:
        return named[text]
    if text.endswith(".json"):
        return recipe_from_file(Path(text))
    if ":" in text:
        library, params = parse_params(text)
        if library not in BACKENDS:
            raise UserError(f"recipe {text!r}: unknown library {library!r}; choose from {', '.join(BACKENDS)}")
        return BACKENDS[library].recipe(params, name=text)
    raise UserError(
        f"unknown recipe {text!r}; named recipes: {', '.join(named)} "
        f"(or a parametric form such as hqq:nbits=3,group_size=64; see `whisper-ptq list`)"
    )


def recipe_from_file(path: Path) -> Recipe:
    return recipe_from_dict(read_recipe_file(path), f"recipe file {path}")


def recipe_from_dict(data: dict, where: str) -> Recipe:
    """A recipe saved as `Recipe.to_dict` (a recipe file, an export), checked by its backend like the parametric
    form (`Backend.validate`) before any model loads; `where` names it in errors."""
    library = data.get("library")
    if not isinstance(library, str) or library not in BACKENDS:
        raise UserError(f"{where}: unknown library {library!r}; choose from {', '.join(BACKENDS)}")
    try:
        recipe = Recipe.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where} is not a recipe: {exc}") from None
    BACKENDS[library].validate(recipe, where)
    return recipe


def library_packages() -> list[str]:
    """The pip packages of every backend's libraries: the versions each run records."""
    return list(dict.fromkeys(pkg for backend in BACKENDS.values() for pkg in backend.requires.values()))


def register(backend: Backend) -> None:
    """Add a backend from outside this package (a plugin, e.g. a test-only recipe)."""
    BACKENDS[backend.library] = backend
    named_recipes.cache_clear()


def _load_plugins() -> None:
    """Import each module named in $WHISPER_PTQ_PLUGINS (comma-separated); importing one registers its
    backends. Sweep workers inherit the variable, so a plugin recipe runs in them as in the driver."""
    for name in filter(None, (part.strip() for part in os.environ.get("WHISPER_PTQ_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"cannot import plugin {name!r} named in WHISPER_PTQ_PLUGINS: {exc}") from exc


_load_plugins()


__all__ = [
    "BACKENDS",
    "Backend",
    "BuildContext",
    "Built",
    "backend_for",
    "get_recipe",
    "library_packages",
    "named_recipes",
    "recipe_from_dict",
    "recipe_from_file",
    "register",
]
