"""One evaluation: a (model, recipe) prepared once (`Quantized`), then scored on one or more datasets.

Where each reported number comes from:
- WER / CER: total errors over total reference units of the per-utterance rows (`results.rows.summarize`).
- RTF: sum of the timed region (feature extraction + generate + decoding; after an untimed warm-up batch of
  one second of speech; model load and audio decoding excluded) over the seconds of audio decoded (all of it:
  every engine transcribes recordings of any length, `engines.decoding`).
- decoding: `settings.decoding` (language, task, beam size, fallback, conditioning), recorded in `info`.
- size_bytes: bytes the library's own save path writes (`Backend.save`); fp32_size_bytes what transformers'
  `save_pretrained` writes for the unquantized model (the fp32 recipe's own save), fp16_size_bytes the same
  with the weights in fp16 (how OpenAI ships Whisper: what users download); size_reduction = 1 - size / fp32
  size.
- source_sha256: the SHA-256 of the unquantized weights (names, dtypes, shapes and bytes, in name order).
- peak_rss_bytes: the process's peak resident memory (getrusage), model load and quantization included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from whisper_ptq.backends import BuildContext, Built, backend_for, library_packages
from whisper_ptq.backends.base import directory_bytes, linear_bits_per_weight, linear_layers, unquantized_parts
from whisper_ptq.backends.reuse import quantize_or_reuse
from whisper_ptq.data import SAMPLE_RATE, Dataset, load_audio
from whisper_ptq.engines import set_threads
from whisper_ptq.engines.decoding import Transcript, transcribe
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import WhisperBundle, load_model
from whisper_ptq.models.sources import default_cache_dir
from whisper_ptq.preflight import check_decoding, check_runnable, preflight
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.environment import environment, peak_rss_bytes
from whisper_ptq.results.rows import UtteranceResult, summarize
from whisper_ptq.results.stats import bootstrap_rate_ci
from whisper_ptq.settings import DecodingOptions, Settings


def run_environment() -> dict[str, Any]:
    """The machine, the versions of every quantization library and the CUDA device, recorded with each run."""
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {**environment(library_packages()), "cuda_device": cuda}


def serialized_bytes(save: Callable[[Path], None]) -> int:
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # save_pretrained's bar: a measurement, not work the user asked for
    try:
        with tempfile.TemporaryDirectory(prefix="whisper-ptq-size-") as tmp:
            save(Path(tmp))
            return directory_bytes(Path(tmp))
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def fp32_and_fp16_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """What `save_pretrained` writes for the unquantized model, in fp32 and with its weights cast to fp16
    (tied weights cast once, so they stay tied and are stored once)."""
    halves: dict[int, torch.Tensor] = {}
    half_state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key not in halves:
            halves[key] = tensor.half() if tensor.is_floating_point() else tensor
        half_state[name] = halves[key]
    fp32 = serialized_bytes(model.save_pretrained)
    fp16 = serialized_bytes(lambda d: model.save_pretrained(d, state_dict=half_state))
    return fp32, fp16


def weights_sha256(model: torch.nn.Module) -> str:
    """Identifies the unquantized weights whatever file format they came in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_language(bundle: WhisperBundle, decoding: DecodingOptions) -> None:
    """Refuse decoding options the loaded model cannot honour (its languages are known only now)."""
    decoding.check_model(bundle.english_only, bundle.source.spec)
    token = f"<|{decoding.language}|>"
    if not bundle.english_only and decoding.language != "auto" and token not in bundle.processor.tokenizer.get_vocab():
        raise UserError(f"model {bundle.source.spec} has no language {decoding.language!r}", param="language")


def calibration_key(calib: Dataset) -> str:
    """The calibration audio's identity for a kept build (backends/reuse.py): its spec and each clip's
    fingerprint (audio bytes, text, modifiers), so a changed file is another key."""
    parts = [calib.spec, *(calib.fingerprint(u) for u in calib.utterances)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class Quantized:
    """A Whisper model prepared by one recipe (quantized, or restored from an export), ready to transcribe and to
    evaluate on any number of datasets. `info` holds the facts recorded with every run (size, recipe, threads,
    the backend's own knobs); `built` is what the backend made (its transcriber, and the torch model if any)."""

    def __init__(self, bundle: WhisperBundle, recipe: Recipe, built: Built, settings: Settings, info: dict[str, Any]):
        self.bundle, self.recipe, self.built, self.settings, self.info = bundle, recipe, built, settings, info

    @classmethod
    def build(
        cls, model: str | WhisperBundle, recipe: Recipe, settings: Settings, evaluated: Iterable[Dataset] = ()
    ) -> Quantized:
        """Quantize `model` (a spec, or a loaded bundle) with `recipe`. Everything cheap is validated first
        (recipe, device, model spec, calibration set), then the model is loaded and quantized."""
        calib = preflight(model if isinstance(model, str) else None, recipe, settings, evaluated)
        ctx = BuildContext(
            device=settings.device,
            calibration=(lambda: [calib.load_audio(u) for u in calib.utterances]) if calib else None,
            calibration_spec=calib.spec if calib else None,
            calibration_key=calibration_key(calib) if calib else None,
        )
        calibration_info = {
            "calibration_dataset": calib.spec if calib else None,
            "calibration_utterances": len(calib.utterances) if calib else 0,
        }
        bundle = load_model(model, settings.cache_dir) if isinstance(model, str) else model
        check_language(bundle, settings.decoding)
        extra = {**calibration_info, "source_sha256": weights_sha256(bundle.model)}
        cache = default_cache_dir(settings.cache_dir)
        make = lambda b, r, c: quantize_or_reuse(backend_for(r), b, r, c, extra["source_sha256"], cache)  # noqa: E731
        return cls._build(bundle, recipe, settings, ctx, make, extra)

    @classmethod
    def from_export(cls, path: Path, settings: Settings) -> Quantized:
        """An exported model: the backend restores the saved quantized weights instead of quantizing."""
        from whisper_ptq.export import export_recipe, export_source, load_export_bundle

        recipe = export_recipe(path)
        check_runnable(recipe, settings.device)
        bundle = load_export_bundle(path)
        check_language(bundle, settings.decoding)
        backend = backend_for(recipe)
        restore = lambda b, r, ctx: backend.load(b, r, Path(path), ctx)  # noqa: E731
        extra = {"exported_from": export_source(path)}
        return cls._build(bundle, recipe, settings, BuildContext(device=settings.device), restore, extra)

    @classmethod
    def _build(
        cls,
        bundle: WhisperBundle,
        recipe: Recipe,
        settings: Settings,
        ctx: BuildContext,
        make: Callable[[WhisperBundle, Recipe, BuildContext], Built],
        extra: dict[str, Any],
    ) -> Quantized:
        threads = set_threads(settings.threads)
        fp32_bytes, fp16_bytes = fp32_and_fp16_bytes(bundle.model)
        layers = linear_layers(bundle.model)
        backend = backend_for(recipe)
        with tempfile.TemporaryDirectory(prefix="whisper-ptq-work-") as work:
            ctx.work_dir = Path(work)
            start = time.perf_counter()
            built = make(bundle, recipe, ctx)
            quantize_seconds = time.perf_counter() - start
            kept = built.info.get("kept_build")  # the backend's save output, already on disk (backends/reuse.py)
            size = directory_bytes(Path(kept) / "model") if kept else serialized_bytes(lambda d: backend.save(built, d))
        info: dict[str, Any] = {
            "model": bundle.source.spec,
            "model_kind": bundle.source.kind,
            "recipe": recipe.name,
            "recipe_spec": recipe.to_dict(),
            "device": settings.device,
            "threads": threads,
            "batch_size": settings.batch_size,
            "decoding": settings.decoding.to_dict(),
            "quantize_seconds": quantize_seconds,
            "size_bytes": size,
            "fp32_size_bytes": fp32_bytes,
            "fp16_size_bytes": fp16_bytes,
            "size_reduction": 1.0 - size / fp32_bytes,
            **extra,
            **built.info,
        }
        if isinstance(built.model, torch.nn.Module):
            if "linear_bits_per_weight" not in info:
                info["linear_bits_per_weight"] = linear_bits_per_weight(built.model, layers)
            info["unquantized"] = unquantized_parts(built.model, layers)
        return cls(bundle, recipe, built, settings, info)

    @property
    def size_bytes(self) -> int:
        """Bytes the library's own save path writes for this model."""
        return int(self.info["size_bytes"])

    @property
    def model(self) -> Any:
        """The quantized torch model, or None for engines that hold their own (CTranslate2, the fast engine)."""
        return self.built.model if isinstance(self.built.model, torch.nn.Module) else None

    def transcribe(
        self,
        audio: str | Path | np.ndarray | Sequence[str | Path | np.ndarray],
        *,
        language: str | None = None,
        task: str | None = None,
        beam_size: int | None = None,
    ) -> str | list[str]:
        """Text of one recording of any length (a path to any audio file libsndfile reads, or 16 kHz mono float32
        samples), or the texts of a list of them, transcribed `settings.batch_size` at a time. `language` (a
        Whisper code, or "auto": detected per recording), `task` ("transcribe", "translate") and `beam_size`
        change the decoding the model was opened with (`settings.decoding`: English, greedy) for this call."""
        decoding = self._decoding(language=language, task=task, beam_size=beam_size)
        one = isinstance(audio, str | Path | np.ndarray)
        items = [audio] if one else list(audio)
        audios = [load_audio(a) if isinstance(a, str | Path) else np.asarray(a, dtype=np.float32) for a in items]
        size = self.settings.batch_size
        batches = (audios[i : i + size] for i in range(0, len(audios), size))
        texts = [t.text for batch in batches for t in self.transcribe_timed(batch, decoding)[0]]
        return texts[0] if one else texts

    def _decoding(self, **changes: Any) -> DecodingOptions:
        """`settings.decoding` with `changes` (None: unchanged), refused as a run would refuse it."""
        changed = {key: value for key, value in changes.items() if value is not None}
        if not changed:
            return self.settings.decoding
        decoding = dataclasses.replace(self.settings.decoding, **changed)
        check_decoding(self.recipe, decoding)
        check_language(self.bundle, decoding)
        return decoding

    def transcribe_timed(
        self, audios: list[np.ndarray], decoding: DecodingOptions | None = None
    ) -> tuple[list[Transcript], float]:
        start = time.perf_counter()
        transcripts = transcribe(self.built.transcriber, audios, decoding or self.settings.decoding)
        if self.info["device"].startswith("cuda"):
            torch.cuda.synchronize()
        return transcripts, time.perf_counter() - start

    def save(self, out_dir: str | Path, *, force: bool = False, evaluate_on: Dataset | None = None) -> Path:
        """Export the model to `out_dir`: what its library's users load, with a model card (README.md) that
        says how. Refused when `out_dir` holds anything, unless `force` and it is an earlier export, which is
        then replaced. `evaluate_on`: a dataset scored after saving, its WER/CER/RTF put on the model card.
        `whisper_ptq.load` restores the export."""
        from whisper_ptq.export import write_export

        evaluate = (lambda: self.evaluate(evaluate_on, progress=self.settings.progress)) if evaluate_on else None
        write_export(self, Path(out_dir), force=force, evaluate=evaluate)
        return Path(out_dir)

    def evaluate(
        self,
        dataset: Dataset,
        batch_size: int | None = None,
        done: Iterable[str] = (),
        on_rows: Callable[[list[UtteranceResult]], None] | None = None,
        progress: bool = True,
    ) -> EvalResult:
        """Transcribe every utterance not in `done`, `batch_size` at a time (default: the settings'), handing
        each batch's rows to `on_rows` as it ends."""
        if not dataset.has_transcripts:
            raise UserError(f"dataset {dataset.spec!r} has no transcripts: it can only be used for calibration")
        batch_size = batch_size or self.settings.batch_size
        done = set(done)
        todo = [u for u in dataset.utterances if u.id not in done]
        rows: list[UtteranceResult] = []
        if todo:
            # Untimed warm-up (one-time kernel and allocator setup) at the timed batch shape. One second of
            # speech keeps it cheap: the encoder sees 30 s of padded input anyway, and decoding stops early.
            first_second = dataset.load_audio(todo[0])[:SAMPLE_RATE]
            self.transcribe_timed([first_second] * min(batch_size, len(todo)))
        bar = tqdm(total=len(todo), desc=f"{self.recipe.name} {dataset.spec}", unit="utt", disable=not progress)
        for i in range(0, len(todo), batch_size):
            batch = todo[i : i + batch_size]
            audios = [dataset.load_audio(u) for u in batch]
            transcripts, seconds = self.transcribe_timed(audios)
            new = [
                UtteranceResult.scored(
                    u.id,
                    u.text,
                    t.text,
                    len(audio) / SAMPLE_RATE,
                    seconds / len(batch),
                    dataset.fingerprint(u),
                    t.language,
                    t.hit_token_limit,
                    t.decoded_seconds,
                )
                for u, audio, t in zip(batch, audios, transcripts, strict=True)
            ]
            if on_rows:
                on_rows(new)
            rows.extend(new)
            bar.update(len(batch))
        bar.close()
        return EvalResult(dataset=dataset.spec, rows=rows, info={**self.info, "batch_size": batch_size})


@dataclass
class EvalResult:
    """The rows of one evaluation and the run's facts; the figures are computed from the rows
    (`results.rows.summarize`), once."""

    dataset: str
    rows: list[UtteranceResult]
    info: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def figures(self) -> dict[str, float | int]:
        return summarize(self.rows)

    @property
    def wer(self) -> float:
        """Corpus WER in percent."""
        return float(self.figures["wer"])

    @property
    def cer(self) -> float:
        """Corpus CER in percent."""
        return float(self.figures["cer"])

    @property
    def rtf(self) -> float:
        """Transcription seconds over decoded audio seconds."""
        return float(self.figures["rtf"])

    @property
    def size_bytes(self) -> int:
        return int(self.info["size_bytes"])

    def summary(self) -> dict[str, Any]:
        wer_ci = bootstrap_rate_ci([r.word_errors for r in self.rows], [r.ref_words for r in self.rows])
        cer_ci = bootstrap_rate_ci([r.char_errors for r in self.rows], [r.ref_chars for r in self.rows])
        return {
            **self.info,
            "dataset": self.dataset,
            **self.figures,
            "wer_ci95": [wer_ci.low, wer_ci.high],  # bootstrap over utterances (`results.stats`)
            "cer_ci95": [cer_ci.low, cer_ci.high],
            "peak_rss_bytes": peak_rss_bytes(),
            **run_environment(),
            "argv": sys.argv,
        }
