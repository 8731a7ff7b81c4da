"""Accuracy metrics, computed the standard way.

Both reference and hypothesis are normalized with OpenAI Whisper's English text normalizer (the
`whisper-normalizer` package ships it, spelling map included). WER and CER are corpus-level: total errors
over total reference words (characters, spaces included), as percentages, never a mean of per-utterance
rates. Edit distances come from jiwer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer


@cache
def _normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return _normalizer()(text).strip()


@dataclass(frozen=True)
class UtteranceScore:
    reference: str  # normalized
    hypothesis: str  # normalized
    ref_words: int
    word_errors: int
    ref_chars: int
    char_errors: int


def score_utterance(reference: str, hypothesis: str) -> UtteranceScore:
    ref, hyp = normalize(reference), normalize(hypothesis)
    words = jiwer.process_words(ref, hyp)
    chars = jiwer.process_characters(ref, hyp)
    return UtteranceScore(
        reference=ref,
        hypothesis=hyp,
        ref_words=len(ref.split()),
        word_errors=words.substitutions + words.deletions + words.insertions,
        ref_chars=len(ref),
        char_errors=chars.substitutions + chars.deletions + chars.insertions,
    )


def error_rate(errors: Iterable[int], totals: Iterable[int]) -> float:
    """Corpus error rate in percent: sum of errors / sum of reference units."""
    total = sum(totals)
    return 100.0 * sum(errors) / total if total else float("nan")


def corpus_rates(scores: Iterable[UtteranceScore]) -> tuple[float, float]:
    """(WER %, CER %) of a list of scored utterances."""
    scores = list(scores)
    wer = error_rate((s.word_errors for s in scores), (s.ref_words for s in scores))
    cer = error_rate((s.char_errors for s in scores), (s.ref_chars for s in scores))
    return wer, cer
