"""The whisper.cpp engine: a ggml model file run by libwhisper, the library pywhispercpp's wheel bundles.

`WhisperCppTranscriber` is a step-wise engine (`engines.decoding.StepModel`) over whisper.cpp's own low-level
API: `whisper_set_mel` + `whisper_encode` (the convolutions, the encoder and the cross-attention keys/values, in
ggml's kernels) and `whisper_decode` + `whisper_get_logits` (the decoder over given tokens with its KV cache).
The search, the prompts, the suppressed tokens, the timestamp rules and the long-form loop are therefore
`engines.decoding`'s, exactly as for every other engine; only the arithmetic is whisper.cpp's.

pywhispercpp binds `whisper_decode` and `whisper_get_logits` in a form Python cannot use (a token pointer, a
bare float pointer), so this module calls libwhisper through ctypes, on the very copy pywhispercpp loads.
`WhisperCppNative` runs `whisper_full` instead, through pywhispercpp: whisper.cpp's own decoding loop.
"""

from __future__ import annotations

import collections
import ctypes
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ptq.data.audio import SAMPLE_RATE
from whisper_ptq.engines.decoding import (
    Decoded,
    Logits,
    Prompt,
    Search,
    StepDecoding,
    StepRules,
    Transcript,
    transcribe,
)
from whisper_ptq.errors import UserError
from whisper_ptq.settings import DecodingOptions


def bundled_library(stem: str) -> ctypes.CDLL:
    """One of the shared libraries pywhispercpp's wheel bundles next to its extension module (auditwheel
    renames them `<stem>-<hash>.so.<version>`), loaded by path: the copy pywhispercpp itself runs on."""
    import _pywhispercpp

    folder = Path(_pywhispercpp.__file__).parent / "pywhispercpp.libs"
    found = sorted(folder.glob(f"{stem}-*.so*")) or sorted(folder.glob(f"{stem}.so*"))
    if not found:
        raise UserError(f"pywhispercpp's bundled {stem} not found in {folder}: reinstall pywhispercpp")
    return ctypes.CDLL(str(found[0]))


class ContextParams(ctypes.Structure):
    """whisper.h `struct whisper_context_params` (its `dtw_aheads` struct inlined: same layout)."""

    _fields_ = [
        ("use_gpu", ctypes.c_bool),
        ("flash_attn", ctypes.c_bool),
        ("gpu_device", ctypes.c_int),
        ("dtw_token_timestamps", ctypes.c_bool),
        ("dtw_aheads_preset", ctypes.c_int),
        ("dtw_n_top", ctypes.c_int),
        ("dtw_aheads_n_heads", ctypes.c_size_t),
        ("dtw_aheads_heads", ctypes.c_void_p),
        ("dtw_mem_size", ctypes.c_size_t),
    ]


LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
# whisper.cpp (and ggml) log to stderr by default; kept here instead, and shown when loading fails.
LOG: collections.deque[str] = collections.deque(maxlen=200)


@LOG_CALLBACK
def _keep_log(level: int, text: bytes | None, user_data: Any) -> None:
    if text:
        LOG.append(text.decode("utf-8", errors="replace"))


@cache
def libwhisper() -> ctypes.CDLL:
    """libwhisper with the signatures this module calls (whisper.h of the bundled version)."""
    lib = bundled_library("libwhisper")
    ctx, c_int = ctypes.c_void_p, ctypes.c_int
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "whisper_context_default_params": (ContextParams, []),
        "whisper_init_from_file_with_params": (ctx, [ctypes.c_char_p, ContextParams]),
        "whisper_free": (None, [ctx]),
        "whisper_set_mel": (c_int, [ctx, ctypes.POINTER(ctypes.c_float), c_int, c_int]),
        "whisper_encode": (c_int, [ctx, c_int, c_int]),
        "whisper_decode": (c_int, [ctx, ctypes.POINTER(ctypes.c_int32), c_int, c_int, c_int]),
        "whisper_get_logits": (ctypes.POINTER(ctypes.c_float), [ctx]),
        "whisper_n_vocab": (c_int, [ctx]),
        "whisper_n_text_ctx": (c_int, [ctx]),
        "whisper_log_set": (None, [LOG_CALLBACK, ctypes.c_void_p]),
        "whisper_version": (ctypes.c_char_p, []),
        "whisper_print_system_info": (ctypes.c_char_p, []),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    lib.whisper_log_set(_keep_log, None)
    return lib


def library_version() -> str:
    return libwhisper().whisper_version().decode()


def system_info() -> str:
    """The SIMD paths ggml's CPU backend was built with (AVX2, AVX512, ...)."""
    return libwhisper().whisper_print_system_info().decode().strip()


def _load_error(path: Path) -> UserError:
    lines = [line.strip() for line in LOG if "error" in line.lower() or "failed" in line.lower()]
    return UserError(f"whisper.cpp cannot load {path}: {lines[-1] if lines else 'see its log'}")


class Context:
    """One whisper.cpp context (the model and its default state: one encoded window, one KV cache)."""

    def __init__(self, path: Path, flash_attn: bool):
        lib = libwhisper()
        params = lib.whisper_context_default_params()
        params.use_gpu = False
        params.flash_attn = flash_attn
        LOG.clear()
        self.pointer = lib.whisper_init_from_file_with_params(str(path).encode(), params)
        if not self.pointer:
            raise _load_error(path)
        self._free = lib.whisper_free  # held: module globals may be gone when the last reference dies at exit
        self.n_vocab = lib.whisper_n_vocab(self.pointer)
        self.n_text_ctx = lib.whisper_n_text_ctx(self.pointer)

    def __del__(self) -> None:
        if getattr(self, "pointer", None):
            self._free(self.pointer)
            self.pointer = None

    def encode(self, mel: np.ndarray, threads: int) -> None:
        """Encode one (mels, frames) log-mel window into the context's state."""
        lib = libwhisper()
        mel = np.ascontiguousarray(mel, np.float32)
        data = mel.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        _check(lib.whisper_set_mel(self.pointer, data, mel.shape[1], mel.shape[0]), "whisper_set_mel")
        _check(lib.whisper_encode(self.pointer, 0, threads), "whisper_encode")

    def decode(self, tokens: list[int], past: int, threads: int) -> np.ndarray:
        """Run the decoder over `tokens` after the first `past` cached positions (dropping any later ones);
        a copy of the logits of the last token, (n_vocab,)."""
        if past + len(tokens) > self.n_text_ctx:
            raise ValueError(f"whisper.cpp's decoder has {self.n_text_ctx} positions, not {past + len(tokens)}")
        lib = libwhisper()
        ids = (ctypes.c_int32 * len(tokens))(*tokens)
        _check(lib.whisper_decode(self.pointer, ids, len(tokens), past, threads), "whisper_decode")
        rows = np.ctypeslib.as_array(lib.whisper_get_logits(self.pointer), shape=(len(tokens) * self.n_vocab,))
        return rows[-self.n_vocab :].copy()


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with status {status}: {LOG[-1].strip() if LOG else 'no log'}")


class WhisperCppTranscriber(StepDecoding):
    """A whisper.cpp model file under `engines.decoding`'s decoding (see the module docstring).

    whisper.cpp's context holds one encoded window and one KV cache, so windows are decoded one after the
    other: a batch gives exactly the texts of batch size 1. `model` is the transformers model the file was
    converted from (or an export's architecture): its generation config gives the decoding rules.
    """

    def __init__(self, path: Path, model: Any, processor: Any, threads: int, flash_attn: bool, workspace: Any = None):
        self.processor, self.threads_used, self.flash_attn = processor, threads, flash_attn
        # Owns the converted file when it lives in a temporary directory, so `save` can copy it later.
        self.workspace: tempfile.TemporaryDirectory | None = workspace
        self.multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
        self.max_target_positions = int(model.config.max_target_positions)
        self.generation_config = model.generation_config
        self.rules = StepRules.from_model(model)
        self.context = Context(path, flash_attn)

    def decode(self, features: np.ndarray, prompt: Prompt, search: Search) -> list[Decoded]:
        return [d for i in range(len(features)) for d in StepDecoding.decode(self, features[i : i + 1], prompt, search)]

    def detect_language(self, features: np.ndarray) -> list[int]:
        return [t for i in range(len(features)) for t in StepDecoding.detect_language(self, features[i : i + 1])]

    def encode(self, features: Any) -> Any:
        """features: (1, mels, frames); the context now holds its encoding, which the decoder reads."""
        self.context.encode(features[0].numpy(), self.threads_used)
        return features

    def start(self, encoded: Any, prompt: Any, max_length: int) -> tuple[Logits, Any]:
        return self._logits(self.context.decode(prompt[0].tolist(), 0, self.threads_used)), None

    def step(self, tokens: Any, position: int, state: Any) -> Logits:
        return self._logits(self.context.decode(tokens[0].tolist(), position, self.threads_used))

    def keep(self, state: Any, rows: list[int]) -> Any:
        raise AssertionError("whisper.cpp windows are decoded one at a time: no row ever leaves a batch")

    @staticmethod
    def _logits(values: np.ndarray) -> Logits:
        import torch

        return Logits(torch.from_numpy(values)[None])

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        return [t.text for t in transcribe(self, audios, DecodingOptions())]


class WhisperCppNative:
    """whisper.cpp's own decoding, `whisper_full` through pywhispercpp, over the waveform of each recording: its
    log-mel, its prompts, suppressed tokens, timestamp rules, token limit (n_text_ctx / 2 - 4 = 220 a window),
    sequential long form and no-speech skipping, its text. From `whisper_full_default_params(GREEDY)` only the
    study's options change (`parameters`): language and task, temperature fallback (off: one decoding at
    temperature 0; on: whisper.cpp's own, steps of 0.2 with best-of-5 sampling) and the previous-text prompt.

    whisper_full does not report a window stopped at its token limit, so these transcripts never say so (a
    runaway still shows as insertions); windows are counted as the encoder runs."""

    def __init__(self, path: Path, multilingual: bool, threads: int, flash_attn: bool, workspace: Any = None):
        import _pywhispercpp as pw

        self.multilingual, self.threads_used, self.flash_attn = multilingual, threads, flash_attn
        self.workspace: tempfile.TemporaryDirectory | None = workspace
        libwhisper()  # whisper.cpp's log goes to LOG, not stderr
        params = pw.whisper_context_default_params()
        params.use_gpu, params.flash_attn = False, flash_attn
        LOG.clear()
        try:
            self.context = pw.whisper_init_from_file_with_params(str(path), params)
        except RuntimeError:
            raise _load_error(path) from None

    def parameters(self, options: DecodingOptions) -> dict[str, Any]:
        """The whisper_full_params fields set from whisper_full_default_params(GREEDY)."""
        return {
            "n_threads": self.threads_used,
            "print_progress": False,
            "language": options.language if self.multilingual else "en",  # "auto": detected on the first 30 s
            "translate": options.task == "translate",
            "temperature_inc": 0.2 if options.temperature_fallback else 0.0,  # 0.2: whisper.cpp's default
            "no_context": not options.condition_on_previous_text,
        }

    def transcribe_recordings(self, audios: list[np.ndarray], options: DecodingOptions) -> list[Transcript]:
        import _pywhispercpp as pw

        params = pw.whisper_full_default_params(pw.whisper_sampling_strategy.WHISPER_SAMPLING_GREEDY)
        for key, value in self.parameters(options).items():
            setattr(params, key, value)
        windows = 0

        def count_window(context: Any) -> bool:
            nonlocal windows
            windows += 1
            return True

        pw.assign_encoder_begin_callback(params, count_window)
        transcripts = []
        for audio in audios:
            samples = np.ascontiguousarray(audio, np.float32)
            windows = 0
            _check(pw.whisper_full(self.context, params, samples, samples.size), "whisper_full")
            segments = range(pw.whisper_full_n_segments(self.context))
            text = b"".join(pw.whisper_full_get_segment_text(self.context, i) for i in segments)
            language = pw.whisper_lang_str(pw.whisper_full_lang_id(self.context))
            transcripts.append(
                Transcript(
                    text.decode("utf-8", errors="replace"),
                    "en" if options.task == "translate" or not self.multilingual else language,
                    False,
                    len(audio) / SAMPLE_RATE,
                    windows,
                )
            )
        return transcripts

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        return [t.text for t in self.transcribe_recordings(audios, DecodingOptions())]
