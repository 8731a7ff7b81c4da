"""One transcribed utterance, and the figures of a set of them: the one place WER, CER and RTF are computed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from whisper_ptq.results.metrics import error_rate, score_utterance


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
    source: str = ""  # `Dataset.fingerprint` of what it was computed from (audio, reference, modifiers)

    @classmethod
    def scored(
        cls, id: str, reference: str, hypothesis: str, audio_seconds: float, seconds: float, source: str = ""
    ) -> UtteranceResult:
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
            source=source,
        )

    def rescored(self) -> UtteranceResult:
        """This row with its error counts computed again from its texts (equal to it unless it was altered)."""
        score = score_utterance(self.reference, self.hypothesis)
        counts = {k: getattr(score, k) for k in ("ref_words", "word_errors", "ref_chars", "char_errors")}
        return replace(self, **counts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(rows: Iterable[UtteranceResult]) -> dict[str, float | int]:
    """The accuracy and speed figures of a set of rows: corpus WER and CER from the rows' error counts (the
    counts confidence intervals and paired tests use too), and RTF = timed seconds / audio seconds."""
    rows = list(rows)
    audio = sum(r.audio_seconds for r in rows)
    return {
        "n_utterances": len(rows),
        "audio_seconds": audio,
        "wer": error_rate((r.word_errors for r in rows), (r.ref_words for r in rows)),
        "cer": error_rate((r.char_errors for r in rows), (r.ref_chars for r in rows)),
        "rtf": sum(r.seconds for r in rows) / audio if audio else math.nan,
    }
