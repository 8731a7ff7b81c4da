"""Transcription engines: each turns 16 kHz audio into text with one inference library's kernels.

Every engine implements `Transcriber`, so the evaluator times and scores them all the same way. The decoding
is the same in all of them: greedy, English, task transcribe, no timestamps, batched, with transformers'
Whisper `generate` rules (prompt, suppressed tokens, length limit). `hf` is transformers itself, `ct2`
CTranslate2, `fast` this project's lean CPU engine, `onnx` ONNX Runtime and `openvino` OpenVINO (the last three
share one greedy loop, `decoding`). `faster_whisper` is the exception by design: faster-whisper's own pipeline
with its own defaults, for reproducing what its users get.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np


class Transcriber(Protocol):
    """Turns a batch of 16 kHz mono float32 waveforms into text (feature extraction included)."""

    def transcribe(self, audios: list[np.ndarray]) -> list[str]: ...


def set_threads(threads: int | None) -> int:
    """Set intra-op threads (None keeps torch's default) and return the number in force."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
