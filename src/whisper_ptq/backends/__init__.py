"""Registry of quantization backends: adding a library means one module here and one line below."""

from __future__ import annotations

from functools import cache

from whisper_ptq.backends.base import Backend, BuildContext, Quantized
from whisper_ptq.backends.reference import ReferenceBackend
from whisper_ptq.recipes import Recipe

BACKENDS: dict[str, Backend] = {
    backend.library: backend
    for backend in (
        ReferenceBackend(),
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


__all__ = ["BACKENDS", "Backend", "BuildContext", "Quantized", "backend_for", "named_recipes"]
