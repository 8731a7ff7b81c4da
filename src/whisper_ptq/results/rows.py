"""One transcribed utterance, and the figures of a set of them: the one place WER, CER and RTF are computed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from whisper_ptq.results.metrics import corpus_rates, score_utterance


@dataclass(frozen=True)
class UtteranceResult:
    id: str
    reference: str
    hypothesis: str
    ref_words: int
    word_errors: int
    ref_chars: int
    char_errors: int
    audio_seconds: float
    seconds: float  # this utterance's share of its batch's timed region

    @classmethod
    def scored(cls, id: str, reference: str, hypothesis: str, audio_seconds: float, seconds: float) -> UtteranceResult:
        """A row with its error counts, scored the standard way (`metrics.score_utterance`)."""
        score = score_utterance(reference, hypothesis)
        return cls(
            id=id,
            reference=reference,
            hypothesis=hypothesis.strip(),
            ref_words=score.ref_words,
            word_errors=score.word_errors,
            ref_chars=score.ref_chars,
            char_errors=score.char_errors,
            audio_seconds=audio_seconds,
            seconds=seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(rows: Iterable[UtteranceResult]) -> dict[str, float | int]:
    """The accuracy and speed figures of a set of rows: corpus WER and CER (re-scored from the texts), and
    RTF = timed seconds / audio seconds."""
    rows = list(rows)
    scores = [score_utterance(r.reference, r.hypothesis) for r in rows]
    wer, cer = corpus_rates(scores)
    audio = sum(r.audio_seconds for r in rows)
    return {
        "n_utterances": len(rows),
        "audio_seconds": audio,
        "wer": wer,
        "cer": cer,
        "rtf": sum(r.seconds for r in rows) / audio if audio else math.nan,
    }
