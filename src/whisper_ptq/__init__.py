"""whisper-ptq: what post-training quantization costs a Whisper speech recognizer, measured.

    import whisper_ptq
    q = whisper_ptq.quantize("tiny.en", "ct2-int8")
    print(q.transcribe("clip.flac"))
    print(whisper_ptq.evaluate(q, "librispeech:test-clean", limit=5).wer)

The names below are loaded on first use (see `api`), so `import whisper_ptq` stays instant and imports no
model library until a model is needed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported transitively by transformers, torchao logs at import time that its CUDA-only extensions are
# missing, and torch warns about torchao's enum registration: noise on every CPU run, not a user problem.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# public name -> module that defines it
_EXPORTS = {
    "quantize": "whisper_ptq.api",
    "evaluate": "whisper_ptq.api",
    "bench": "whisper_ptq.api",
    "load": "whisper_ptq.api",
    "BenchResult": "whisper_ptq.api",
    "Quantized": "whisper_ptq.evaluation",
    "EvalResult": "whisper_ptq.evaluation",
    "Recipe": "whisper_ptq.recipes",
    "UserError": "whisper_ptq.errors",
    "get_recipe": "whisper_ptq.backends",
    "named_recipes": "whisper_ptq.backends",
    "open_dataset": "whisper_ptq.data",
}

__all__ = [
    "BenchResult",
    "EvalResult",
    "Quantized",
    "Recipe",
    "UserError",
    "__version__",
    "bench",
    "evaluate",
    "get_recipe",
    "load",
    "named_recipes",
    "open_dataset",
    "quantize",
]

if TYPE_CHECKING:
    from whisper_ptq.api import BenchResult, bench, evaluate, load, quantize
    from whisper_ptq.backends import get_recipe, named_recipes
    from whisper_ptq.data import open_dataset
    from whisper_ptq.errors import UserError
    from whisper_ptq.evaluation import EvalResult, Quantized
    from whisper_ptq.recipes import Recipe


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
