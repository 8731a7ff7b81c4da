"""One transcribed utterance, and the figures of a set of them: the one place WER, CER and RTF are computed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from whisper_ptq.results.metrics import error_rate, headline_metric, score_utterance

WINDOW_SECONDS = 30.0  # Whisper's window: longer utterances are long-form
_COUNTS = ("ref_words", "word_errors", "ref_chars", "char_errors", "substitutions", "deletions", "insertions")


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
    substitutions: int = 0  # word level
    deletions: int = 0
    insertions: int = 0
    language: str = "en"  # the language of the texts (normalizer): the speech's, or English for translations
    hit_token_limit: bool = False  # some window stopped at the token limit
    decoded_seconds: float | None = None  # audio the engine decoded (None: audio_seconds)

    @classmethod
    def scored(
        cls,
        id: str,
        reference: str,
        hypothesis: str,
        audio_seconds: float,
        seconds: float,
        source: str = "",
        language: str = "en",
        hit_token_limit: bool = False,
        decoded_seconds: float | None = None,
    ) -> UtteranceResult:
        """A row with its error counts, scored the standard way (`metrics.score_utterance`)."""
        score = score_utterance(reference, hypothesis, language)
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
            substitutions=score.substitutions,
            deletions=score.deletions,
            insertions=score.insertions,
            language=language,
            hit_token_limit=hit_token_limit,
            decoded_seconds=audio_seconds if decoded_seconds is None else decoded_seconds,
        )

    def rescored(self) -> UtteranceResult:
        """This row with its error counts computed again from its texts (equal to it unless it was altered)."""
        score = score_utterance(self.reference, self.hypothesis, self.language)
        return replace(self, **{k: getattr(score, k) for k in _COUNTS})

    @property
    def decoded(self) -> float:
        return self.audio_seconds if self.decoded_seconds is None else self.decoded_seconds

    @property
    def runaway(self) -> bool:
        """Some window stopped at the token limit, or more words were inserted than the reference has: the
        decoder looped or hallucinated."""
        return self.hit_token_limit or self.insertions > self.ref_words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(rows: Iterable[UtteranceResult]) -> dict[str, Any]:
    """The accuracy and speed figures of a set of rows, all from the rows' stored error counts (the counts
    confidence intervals and paired tests use too): corpus WER and CER, word substitutions / deletions /
    insertions, runaways, utterances longer than Whisper's 30 s window, and RTF = timed seconds / decoded
    audio seconds."""
    rows = list(rows)
    audio = sum(r.audio_seconds for r in rows)
    decoded = sum(r.decoded for r in rows)
    return {
        "n_utterances": len(rows),
        "audio_seconds": audio,
        "decoded_seconds": decoded,
        "long_utterances": sum(r.audio_seconds > WINDOW_SECONDS for r in rows),
        "wer": error_rate((r.word_errors for r in rows), (r.ref_words for r in rows)),
        "cer": error_rate((r.char_errors for r in rows), (r.ref_chars for r in rows)),
        "headline": headline_metric(r.language for r in rows),
        "substitutions": sum(r.substitutions for r in rows),
        "deletions": sum(r.deletions for r in rows),
        "insertions": sum(r.insertions for r in rows),
        "runaways": sum(r.runaway for r in rows),
        "rtf": sum(r.seconds for r in rows) / decoded if decoded else math.nan,
    }
