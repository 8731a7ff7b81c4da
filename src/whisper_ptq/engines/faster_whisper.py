"""faster-whisper's own pipeline (`WhisperModel.transcribe`) over a CTranslate2 model folder: what its users get.

The study's common decoding (`engines/ct2.py`) runs the same CTranslate2 model under transformers' rules;
this engine instead keeps faster-whisper's defaults and sets only what the study fixes for every system:
greedy (`beam_size=1`), temperature 0 with no fallback, no timestamps, no conditioning on previous text, no
VAD, English, each changed by the run's decoding options (`--language`, `--task`, `--beam-size`,
`--temperature-fallback`, `--condition-on-previous-text`) where faster-whisper has them. What faster-whisper
then does differently (benchmarks/faster_whisper_settings.py measures each):
its own log-mel features (numpy STFT); a window whose no-speech probability exceeds 0.6 while its average log
probability is below -1 is dropped; at most 224 tokens per window (it passes max_length=448 to CTranslate2,
which decodes half of that); audio past 30 s is decoded in further windows by its own seek loop (the common
decoding's long form is OpenAI's, with timestamps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ptq.engines.decoding import Transcript
from whisper_ptq.settings import AUTO, DecodingOptions

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


def transcribe_settings(options: DecodingOptions) -> dict[str, Any]:
    """`STUDY_SETTINGS` with the run's decoding options: language (`auto`: faster-whisper detects it), task,
    beam size, fallback (faster-whisper's own temperatures, 0.0 to 1.0), conditioning on previous text."""
    return {
        **STUDY_SETTINGS,
        "language": None if options.language == AUTO else options.language,
        "task": options.task,
        "beam_size": options.beam_size,
        "temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if options.temperature_fallback else 0.0,
        "condition_on_previous_text": options.condition_on_previous_text,
    }


class FasterWhisperTranscriber:
    """`decoding.Pipeline` running `faster_whisper.WhisperModel.transcribe` on each recording (its pipeline takes
    one at a time, of any length). `overrides` changes transcribe's arguments (the settings benchmark);
    `workspace`, a TemporaryDirectory holding the model, lives as long as the transcriber."""

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
        self.overrides = overrides or {}
        self.workspace = workspace

    def transcribe_recordings(self, audios: Sequence[np.ndarray], options: DecodingOptions) -> list[Transcript]:
        settings = {**transcribe_settings(options), **self.overrides}
        transcripts = []
        for audio in audios:
            segments, info = self.model.transcribe(audio, **settings)
            text = "".join(segment.text for segment in segments)  # a generator: decoding happens here
            language = "en" if options.task == "translate" else info.language
            windows = max(1, math.ceil(info.duration / 30.0))
            # faster-whisper does not say whether a window stopped at its token limit
            transcripts.append(Transcript(text, language, False, info.duration_after_vad, windows))
        return transcripts
