"""Loading a Whisper model, whatever its source, as an fp32 eval-mode transformers model with its processor.
CTranslate2 sources are converted once (`ct2_format`) and cached under `<cache>/converted/<key>`."""

from __future__ import annotations

import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from whisper_ptq.errors import UserError
from whisper_ptq.models.ct2_format import converted_dir
from whisper_ptq.models.names import ENGLISH_ONLY_VOCAB_SIZE
from whisper_ptq.models.sources import ModelSource, default_cache_dir, first_line, resolve_model

HUB_PROBE_TIMEOUT_S = 3.0
OFFLINE_ALTERNATIVES = (
    "use a packaged model (base, tiny.en), a local transformers directory or a local CTranslate2 directory"
)


@dataclass
class WhisperBundle:
    """A loaded fp32 eval-mode Whisper model with its processor."""

    model: WhisperForConditionalGeneration
    processor: WhisperProcessor
    source: ModelSource
    hf_dir: Path | None  # local transformers-format dir of this model (the conversion cache for CT2 sources)

    @property
    def english_only(self) -> bool:
        return self.model.config.vocab_size <= ENGLISH_ONLY_VOCAB_SIZE


def load_model(spec: str, cache_dir: Path | str | None = None) -> WhisperBundle:
    """Load `spec` as an fp32 eval-mode transformers Whisper model plus processor."""
    source = resolve_model(spec, cache_dir)
    if source.kind == "hub":
        return _load_hub(source)
    assert source.path is not None
    hf_dir = source.path
    if source.kind in ("packaged", "ct2"):
        hf_dir = converted_dir(source.path, default_cache_dir(cache_dir))
    return _bundle_from_dir(source, hf_dir)


def _bundle_from_dir(source: ModelSource, hf_dir: Path) -> WhisperBundle:
    try:
        model = WhisperForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
        processor = WhisperProcessor.from_pretrained(hf_dir)
    except pickle.UnpicklingError as exc:
        raise _refused_pickle(str(hf_dir), exc) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load Whisper model from {hf_dir}: {first_line(exc)}") from exc
    return WhisperBundle(model.eval(), processor, source, hf_dir)


def _refused_pickle(where: str, exc: pickle.UnpicklingError) -> UserError:
    """torch.load(weights_only=True) refused a pickled weights file (.bin) that holds more than tensors: code
    to run, whether malicious or not. Its message suggests weights_only=False, which would run that code."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    why = next((line for line in lines if line.startswith(("Trying to load", "Unsupported"))), lines[-1])
    return UserError(
        f"cannot load Whisper model from {where}: its pickled weights hold more than tensors, refused unrun "
        f"({why.rstrip('.')}); use safetensors weights from a source you trust"
    )


def _load_hub(source: ModelSource) -> WhisperBundle:
    # A model already in the HF cache must work offline, so try that before touching the network.
    try:
        return _hub_bundle(source, local_files_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused_pickle(repr(source.spec), exc) from None
    except OSError:
        pass
    if reason := _hub_unreachable_reason():
        raise UserError(f"hub model {source.spec!r} is not cached and {reason}; {OFFLINE_ALTERNATIVES}")
    try:
        return _hub_bundle(source, local_files_only=False)
    except pickle.UnpicklingError as exc:
        raise _refused_pickle(repr(source.spec), exc) from None
    except OSError as exc:
        raise UserError(f"cannot download hub model {source.spec!r}: {first_line(exc)}") from exc


def _hub_bundle(source: ModelSource, local_files_only: bool) -> WhisperBundle:
    model = WhisperForConditionalGeneration.from_pretrained(
        source.spec, dtype=torch.float32, local_files_only=local_files_only
    )
    processor = WhisperProcessor.from_pretrained(source.spec, local_files_only=local_files_only)
    return WhisperBundle(model.eval(), processor, source, None)


def _hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached, or None; quick, so an offline machine fails at once, not hangs."""
    if hub_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(hub_constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError:
        return f"{host}:{port} is unreachable"


def bundle_of(model: Any, processor: Any = None) -> WhisperBundle:
    """A user's loaded transformers Whisper model as a bundle (moved to fp32, eval mode). Its processor, when not
    given, is the one saved where the model was loaded from (the folder or hub id in its config)."""
    if not isinstance(model, WhisperForConditionalGeneration):
        raise UserError(
            f"model: expected a model spec or a transformers WhisperForConditionalGeneration, "
            f"got {type(model).__name__}",
            param="model",
        )
    name = str(getattr(model.config, "_name_or_path", "") or "")
    if processor is None:
        processor = _saved_processor(name)
    source = ModelSource(name or "in-memory", "object", None)
    return WhisperBundle(model.to(torch.float32).eval(), processor, source, None)


def _saved_processor(name: str) -> WhisperProcessor:
    hint = "pass processor=WhisperProcessor.from_pretrained(...) for this model"
    if not name:
        raise UserError(f"processor: the model does not say where it was loaded from; {hint}", param="processor")
    try:
        return WhisperProcessor.from_pretrained(name, local_files_only=True)
    except OSError:
        pass
    if reason := _hub_unreachable_reason():
        raise UserError(f"processor: none cached for {name!r} and {reason}; {hint}", param="processor")
    try:
        return WhisperProcessor.from_pretrained(name)
    except OSError as exc:
        why = f"processor: cannot load one for {name!r} ({first_line(exc)}); {hint}"
        raise UserError(why, param="processor") from exc
