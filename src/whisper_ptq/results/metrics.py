"""Accuracy metrics, computed the standard way.

Reference and hypothesis are normalized as OpenAI evaluates Whisper (the `whisper-normalizer` package ships
both of its normalizers): English text with the English normalizer (spelling map included), any other language
with the basic one (lower case, punctuation and bracketed text removed, diacritics kept). WER and CER are
corpus-level: total errors over total reference words (characters, spaces included), as percentages, never a
mean of per-utterance rates; substitutions, deletions and insertions are word-level. Edit distances come from
jiwer. Languages written without spaces between words get CER as their headline figure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache

import jiwer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

# Written without spaces between words: a "word" error rate would count whole sentences.
SPACELESS_LANGUAGES = ("zh", "ja", "th", "lo", "my", "km", "bo", "yue")


@cache
def _normalizer(language: str) -> Callable[[str], str]:
    return EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()


def normalize(text: str, language: str = "en") -> str:
    return _normalizer(language)(text).strip()


@dataclass(frozen=True)
class UtteranceScore:
    reference: str  # normalized
    hypothesis: str  # normalized
    ref_words: int
    word_errors: int
    ref_chars: int
    char_errors: int
    substitutions: int = 0  # word-level; word_errors is their sum
    deletions: int = 0
    insertions: int = 0

    @property
    def runaway(self) -> bool:
        """More inserted words than the reference has: the decoder looped or hallucinated."""
        return self.insertions > self.ref_words


def score_utterance(reference: str, hypothesis: str, language: str = "en") -> UtteranceScore:
    ref, hyp = normalize(reference, language), normalize(hypothesis, language)
    words = jiwer.process_words(ref, hyp)
    chars = jiwer.process_characters(ref, hyp)
    return UtteranceScore(
        reference=ref,
        hypothesis=hyp,
        ref_words=len(ref.split()),
        word_errors=words.substitutions + words.deletions + words.insertions,
        ref_chars=len(ref),
        char_errors=chars.substitutions + chars.deletions + chars.insertions,
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions,
    )


def headline_metric(languages: Iterable[str]) -> str:
    """ "cer" when every utterance is in a language written without spaces, else "wer"."""
    languages = list(languages)
    return "cer" if languages and all(lang in SPACELESS_LANGUAGES for lang in languages) else "wer"


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
