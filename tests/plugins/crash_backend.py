"""Test-only backend whose worker dies hard, to check that a sweep survives it.

`crash` calls os.abort() while quantizing; `crash:after=N` runs the fp32 model for N transcribe calls (the
evaluator's untimed warm-up batch is the first), then aborts in the next. Loaded by whisper-ptq through
WHISPER_PTQ_PLUGINS=crash_backend with this folder on PYTHONPATH, which sweep workers inherit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from whisper_ptq.backends import register
from whisper_ptq.backends.base import Backend, BuildContext, Param, Quantized
from whisper_ptq.engine import HFTranscriber
from whisper_ptq.recipes import OptionValue, Recipe


@dataclass
class AbortAfter:
    transcriber: HFTranscriber
    calls_left: int

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        if self.calls_left == 0:
            os.abort()
        self.calls_left -= 1
        return self.transcriber.transcribe(audios)


class CrashBackend(Backend):
    library = "crash"
    description = "test only: aborts the worker process"
    params = {"after": Param(int, 0, help="transcribe calls that succeed before the abort")}
    named = {"crash": ("aborts while quantizing (test only)", {"after": "0"})}

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        return Recipe(
            name=name,
            library=self.library,
            scheme="weight-only",  # not "reference": the sweep would take an fp32 reference for the baseline
            weights="fp32",
            options=(("after", values["after"]),),
            description=description or "aborts the worker (test only)",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Quantized:
        after = int(recipe.option("after"))
        if after == 0:
            os.abort()
        transcriber = HFTranscriber(bundle.model, bundle.processor, device=ctx.device)
        return Quantized(AbortAfter(transcriber, after), bundle.model)


register(CrashBackend())
