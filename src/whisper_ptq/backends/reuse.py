"""Quantized models kept across processes, for the backends whose conversion is slow (`Backend.reuse_builds`).

Opening ov-int8 of whisper-base on two cores took 28 s, 20 of them `openvino.convert_model` tracing the two
graphs (12 s since the trace is not checked, `engines/openvino.py`); ort-int8 15.6 s, mostly `torch.onnx.export`.
A sweep opens a recipe once per worker, and every benchmark run opens it again. The backend's own `save` output
is kept under the model cache (`builds/<key>/model`) and restored with its `load`, the path an export takes, so a
reopened model is the one saved (the export tests check that a reload transcribes as the build did).

The key is everything the saved model depends on: the source weights' sha256 and the model config, the recipe's
fields but those acting only at load (`Backend.load_options`: OpenVINO's compile precision), the versions of
Python, the core packages and the backend's libraries (as every run records them), the source of whisper-ptq's
code that makes a transcript (`environment.TRANSCRIPT_CODE`: the graphs are this project's code), the CPU
class (a quantizer may choose by CPU), and for a calibrated recipe its calibration audio (`BuildContext.
calibration_key`: the spec and every clip's fingerprint, so a file changed under the same spec is another key;
ov-int8-ptq took 183 s to open on two cores).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from whisper_ptq.backends.base import Backend, BuildContext, Built
from whisper_ptq.errors import UserError
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.environment import code_sha256, cpu_class, library_versions

BUILDS = "builds"
FACTS = "build.json"


def build_facts(
    backend: Backend, model: Any, recipe: Recipe, source_sha256: str, calibration_key: str | None
) -> dict[str, Any]:
    return {
        "calibration": calibration_key,
        "source_sha256": source_sha256,
        "config": model.config.to_dict(),
        "recipe": saved_recipe_facts(backend, recipe),
        "versions": library_versions(backend.requires.values()),
        "code_sha256": code_sha256(),
        "cpu_class": cpu_class(),
    }


def saved_recipe_facts(backend: Backend, recipe: Recipe) -> dict[str, Any]:
    """The recipe's fields that decide what is saved: not its name and description, nor the backend's
    `load_options`."""
    facts = {k: v for k, v in recipe.to_dict().items() if k not in ("name", "description")}
    facts["options"] = {k: v for k, v in facts["options"].items() if k not in backend.load_options}
    return facts


def quantize_or_reuse(
    backend: Backend, bundle: Any, recipe: Recipe, ctx: BuildContext, source_sha256: str, cache_dir: Path
) -> Built:
    """The backend's build of `recipe`: restored from the cache when an identical one was kept, else quantized
    and kept; `info["kept_build"]` names the cache entry and `info["reused_build"]` says which."""
    if not backend.reuse_builds or (recipe.needs_calibration and ctx.calibration_key is None):
        return backend.quantize(bundle, recipe, ctx)
    calibration = ctx.calibration_key if recipe.needs_calibration else None
    facts = build_facts(backend, bundle.model, recipe, source_sha256, calibration)
    key = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]
    folder = cache_dir / BUILDS / key
    if (folder / FACTS).is_file():
        try:
            return _noted(backend.load(bundle, recipe, folder / "model", ctx), folder, reused=True)
        except (UserError, OSError, RuntimeError) as error:  # a damaged entry (a file deleted by hand): rebuild
            note = f"warning: rebuilding {recipe.name!r}: the kept build {folder} did not load ({error})"
            print(note, file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    built = backend.quantize(bundle, recipe, ctx)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    except OSError:  # the cache is not writable: nothing kept
        return built
    try:
        (staging / "model").mkdir()
        backend.save(built, staging / "model")
        (staging / FACTS).write_text(json.dumps(facts, indent=1, sort_keys=True, default=str))
        staging.rename(folder)  # atomic: a reader sees a whole entry or none
    except OSError:  # another process kept the same build first, or the disk is full
        shutil.rmtree(staging, ignore_errors=True)
        return built
    return _noted(built, folder, reused=False)


def _noted(built: Built, folder: Path, reused: bool) -> Built:
    built.info.update(kept_build=str(folder), reused_build=reused)
    return built
