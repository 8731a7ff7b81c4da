"""Test-only backend whose worker dies hard, to check that a sweep survives it.

`crash` calls os.abort() while quantizing; `crash:after=N` runs the fp32 model for N window-decoding calls (the
evaluator's untimed warm-up batch is the first), then aborts in the next. With `once=true` only the first
process to get there dies, by SIGKILL as from the OOM killer, and later ones (a retry) run on: the claim
is a marker file in $CRASH_ONCE_DIR holding the pid of the process it killed. Loaded by whisper-ptq through
WHISPER_PTQ_PLUGINS=crash_backend with this folder on PYTHONPATH, which sweep workers inherit.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ptq.backends import register
from whisper_ptq.backends.base import Backend, BuildContext, Built, Param
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.recipes import OptionValue, Recipe


@dataclass
class AbortAfter:
    transcriber: HFTranscriber
    calls_left: int
    once: bool

    def decode(self, features: np.ndarray, prompt: Any, search: Any) -> list[Any]:
        if self.calls_left == 0:
            if not self.once:
                os.abort()
            if _first_to_die():
                os.kill(os.getpid(), signal.SIGKILL)
        self.calls_left -= 1
        return self.transcriber.decode(features, prompt, search)

    def __getattr__(self, name: str) -> Any:  # the rest of the window decoder is the wrapped one's
        return getattr(self.transcriber, name)


def _first_to_die() -> bool:
    """Claim the marker (atomically: O_EXCL), so that of processes racing here exactly one dies."""
    try:
        fd = os.open(Path(os.environ["CRASH_ONCE_DIR"]) / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


class CrashBackend(Backend):
    library = "crash"
    description = "test only: aborts the worker process"
    params = {
        "after": Param(int, 0, help="window-decoding calls that succeed before the abort"),
        "once": Param(bool, False, help="only the first process to get there dies (SIGKILL), a retry runs on"),
    }
    named = {"crash": ("aborts while quantizing (test only)", {"after": "0"})}

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        return Recipe(
            name=name,
            library=self.library,
            scheme="weight-only",  # not "reference": the sweep would take an fp32 reference for the baseline
            weights="fp32",
            options=(("after", values["after"]), ("once", values["once"])),
            description=description or "aborts the worker (test only)",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        after = int(recipe.option("after"))
        if after == 0:
            os.abort()
        transcriber = HFTranscriber(bundle.model, bundle.processor, device=ctx.device)
        return Built(AbortAfter(transcriber, after, bool(recipe.option("once"))), bundle.model)


register(CrashBackend())
