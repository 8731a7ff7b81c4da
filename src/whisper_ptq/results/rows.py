"""One transcribed utterance, and the figures of a set of them: the one place WER, CER and RTF are computed."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from whisper_ptq.results.metrics import corpus_rates, headline_metric, score_utterance

WINDOW_SECONDS = 30.0  # Whisper's window: longer utterances are long-form


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
            substitutions=score.substitutions,
            deletions=score.deletions,
            insertions=score.insertions,
            language=language,
            hit_token_limit=hit_token_limit,
            decoded_seconds=audio_seconds if decoded_seconds is None else decoded_seconds,
        )

    @property
    def decoded(self) -> float:
        return self.audio_seconds if self.decoded_seconds is None else self.decoded_seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(rows: Iterable[UtteranceResult]) -> dict[str, Any]:
    """The accuracy and speed figures of a set of rows: corpus WER and CER (re-scored from the texts), word
    substitutions / deletions / insertions, runaways (a window stopped at the token limit, or more insertions
    than reference words), utterances longer than Whisper's 30 s window, and RTF = timed seconds / decoded
    audio seconds."""
    rows = list(rows)
    scores = [score_utterance(r.reference, r.hypothesis, r.language) for r in rows]
    wer, cer = corpus_rates(scores)
    audio = sum(r.audio_seconds for r in rows)
    decoded = sum(r.decoded for r in rows)
    return {
        "n_utterances": len(rows),
        "audio_seconds": audio,
        "decoded_seconds": decoded,
        "long_utterances": sum(r.audio_seconds > WINDOW_SECONDS for r in rows),
        "wer": wer,
        "cer": cer,
        "headline": headline_metric(r.language for r in rows),
        "substitutions": sum(s.substitutions for s in scores),
        "deletions": sum(s.deletions for s in scores),
        "insertions": sum(s.insertions for s in scores),
        "runaways": sum(r.hit_token_limit or s.runaway for r, s in zip(rows, scores, strict=True)),
        "rtf": sum(r.seconds for r in rows) / decoded if decoded else math.nan,
    }
