"""Scoring: the normalizer of the language, word substitutions / deletions / insertions, runaways, the headline
metric of languages written without spaces, and RTF over the decoded audio."""

from __future__ import annotations

import pytest

from whisper_ptq.results.metrics import headline_metric, normalize, score_utterance
from whisper_ptq.results.rows import UtteranceResult, summarize


def test_english_and_basic_normalizers() -> None:
    assert normalize("Mr. Smith's colour") == "mister smith is color"  # OpenAI's English rules and spellings
    assert normalize("Ça va? Très bien, merci!", "fr") == "ça va très bien merci"  # basic: diacritics kept


def test_substitutions_deletions_insertions() -> None:
    score = score_utterance("the cat sat on the mat", "the bat sat on mat")
    assert (score.substitutions, score.deletions, score.insertions) == (1, 1, 0)
    score = score_utterance("the cat sat", "the cat sat down")
    assert (score.substitutions, score.deletions, score.insertions) == (0, 0, 1)
    assert score.word_errors == 1 and not score.runaway
    assert score_utterance("hello", "hello hello hello").runaway


def test_headline_metric() -> None:
    assert headline_metric(["zh", "ja"]) == "cer"
    assert headline_metric(["zh", "en"]) == "wer" and headline_metric([]) == "wer"


def test_summary_counts_failures_and_long_form() -> None:
    rows = [
        UtteranceResult.scored("a", "one two three", "one two three", 10.0, 1.0),
        UtteranceResult.scored("b", "one two", "one two", 40.0, 4.0, hit_token_limit=True),
        UtteranceResult.scored("c", "four", "four four four", 5.0, 1.0, language="de"),
    ]
    summary = summarize(rows)
    assert (summary["substitutions"], summary["deletions"], summary["insertions"]) == (0, 0, 2)
    assert summary["runaways"] == 2 and summary["long_utterances"] == 1
    assert summary["decoded_seconds"] == 55.0 and summary["rtf"] == pytest.approx(6.0 / 55.0)
    old = UtteranceResult("d", "x", "x", 1, 0, 1, 0, 50.0, 5.0, decoded_seconds=30.0)  # truncated by an old engine
    assert summarize([old])["rtf"] == pytest.approx(5.0 / 30.0)
