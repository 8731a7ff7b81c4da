"""faster-whisper's own pipeline (`WhisperModel.transcribe`) over a CTranslate2 model folder: what its users get.

The study's common decoding (`engines/ct2.py`) runs the same CTranslate2 model under transformers' rules;
this engine instead keeps faster-whisper's defaults and sets only what the study fixes for every system:
greedy (`beam_size=1`), temperature 0 with no fallback, no timestamps, no conditioning on previous text, no
VAD, English. What faster-whisper then does differently (benchmarks/faster_whisper_settings.py measures each):
its own log-mel features (numpy STFT); a window whose no-speech probability exceeds 0.6 while its average log
probability is below -1 is dropped; at most 224 tokens per window (it passes max_length=448 to CTranslate2,
which decodes half of that); audio past 30 s is decoded as a further window, where transformers' features
truncate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# The study's settings; every other argument of WhisperModel.transcribe keeps faster-whisper's default.
STUDY_SETTINGS: dict[str, Any] = {
    "language": "en",
    "task": "transcribe",
    "beam_size": 1,
    "temperature": 0.0,
    "without_timestamps": True,
    "condition_on_previous_text": False,
    "vad_filter": False,
}


class FasterWhisperTranscriber:
    """`Transcriber` running `faster_whisper.WhisperModel.transcribe` on each utterance (its pipeline takes one
    recording at a time). `overrides` changes transcribe's arguments (the settings benchmark); `workspace`, a
    TemporaryDirectory holding the model, lives as long as the transcriber."""

    def __init__(
        self,
        model_dir: Path,
        compute_type: str,
        device: str,
        threads: int,
        workspace: Any = None,
        overrides: dict[str, Any] | None = None,
    ):
        from faster_whisper import WhisperModel

        kind, _, index = device.partition(":")
        self.model = WhisperModel(
            str(model_dir), device=kind, device_index=int(index or 0), compute_type=compute_type, cpu_threads=threads
        )
        self.settings = {**STUDY_SETTINGS, **(overrides or {})}
        self.workspace = workspace

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        texts = []
        for audio in audios:
            segments, _ = self.model.transcribe(audio, **self.settings)
            texts.append("".join(segment.text for segment in segments))
        return texts
