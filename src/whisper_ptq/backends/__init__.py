"""Registry of quantization backends: adding a library means one module here and one line below."""

from __future__ import annotations

import importlib
import os
from functools import cache

from whisper_ptq.backends.base import Backend, BuildContext, Quantized
from whisper_ptq.backends.bnb import BitsAndBytesBackend
from whisper_ptq.backends.ctranslate2 import CTranslate2Backend
from whisper_ptq.backends.fastcpu import FastCPUBackend
from whisper_ptq.backends.hqq import HQQBackend
from whisper_ptq.backends.mixed import MixedBackend
from whisper_ptq.backends.pytorch import PyTorchBackend
from whisper_ptq.backends.quanto import QuantoBackend
from whisper_ptq.backends.reference import ReferenceBackend
from whisper_ptq.backends.torchao import TorchaoBackend
from whisper_ptq.errors import UserError
from whisper_ptq.recipes import Recipe

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
    )
}


@cache
def named_recipes() -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    for backend in BACKENDS.values():
        recipes.update(backend.named_recipes())
    return recipes


def backend_for(recipe: Recipe) -> Backend:
    return BACKENDS[recipe.library]


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


__all__ = ["BACKENDS", "Backend", "BuildContext", "Quantized", "backend_for", "named_recipes", "register"]
