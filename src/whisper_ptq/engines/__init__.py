"""Transcription engines: each decodes 30-second windows of Whisper features with one inference library's kernels.

`decoding` does the rest, once for all of them: features, short and long form (OpenAI's sequential algorithm),
language, task, beam size, fallback, batching. An engine implements `decoding.WindowDecoder` (`Transcriber`
below), or, step-wise, `decoding.StepModel`. `hf` is transformers itself, `ct2` CTranslate2, `fast` this
project's lean CPU engine (step-wise), `onnx` ONNX Runtime and `openvino` OpenVINO (step-wise over the exported
graphs of `graphs`), `whispercpp` whisper.cpp's encoder and decoder (step-wise). `faster_whisper` and
whisper.cpp's own `whisper_full` loop are the exception by design: `decoding.Pipeline`s, each library's own
pipeline with its own defaults, for reproducing what its users get.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from whisper_ptq.engines.decoding import WindowDecoder as Transcriber

__all__ = ["Transcriber", "set_threads"]


def set_threads(threads: int | None) -> int:
    """Set intra-op threads (None keeps torch's default) and return the number in force."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
