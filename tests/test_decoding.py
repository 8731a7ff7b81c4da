"""The decoding shared by every engine (`engines.decoding`): prompts, OpenAI's seek arithmetic, long form on real
speech, batching. The seek tests feed the algorithm chosen token sequences (a model cannot be made to emit
them), with tiny.en's real tokenizer; the rest runs the packaged tiny.en on LibriSpeech recordings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from whisper_ptq.backends import BuildContext, backend_for, get_recipe
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.decoding import (
    N_FRAMES,
    Decoded,
    Prompt,
    Vocabulary,
    _advance,
    _Recording,
    transcribe,
)
from whisper_ptq.models.loading import load_model
from whisper_ptq.models.names import LANGUAGES
from whisper_ptq.results.metrics import score_utterance
from whisper_ptq.settings import DecodingOptions


@pytest.fixture(scope="module")
def tiny(model_cache: Path):
    return load_model("tiny.en", model_cache)


@pytest.fixture(scope="module")
def ct2_int8(tiny):
    recipe = get_recipe("ct2-int8")
    return backend_for(recipe).quantize(tiny, recipe, BuildContext()).transcriber


@pytest.fixture(scope="module")
def recordings(shared_data: Path) -> tuple[list[np.ndarray], list[str]]:
    """The 72.7 s recording of nine test-clean utterances (192 words) and the 17.5 s one of the other two."""
    dataset = open_dataset("librispeech:test-clean+concat:seconds=75,within=dataset", shared_data)
    return [dataset.load_audio(u) for u in dataset.utterances], [u.text for u in dataset.utterances]


def test_language_codes_are_transformers_own() -> None:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES as THEIRS

    assert list(THEIRS) == LANGUAGES


def test_prompts(tiny) -> None:
    vocab = Vocabulary.of(tiny.processor.tokenizer, multilingual=False)
    ids = tiny.processor.tokenizer.convert_tokens_to_ids
    assert vocab.tokens(Prompt(None, "transcribe", False), 448) == tuple(
        ids(["<|startoftranscript|>", "<|notimestamps|>"])
    )
    assert vocab.tokens(Prompt(None, "transcribe", True), 448) == (ids("<|startoftranscript|>"),)
    previous = tuple(range(300))
    prompted = vocab.tokens(Prompt(None, "transcribe", True, previous), 448)
    assert prompted == (ids("<|startofprev|>"), *previous[-223:], ids("<|startoftranscript|>"))  # OpenAI's 223
    assert vocab.timestamp_begin == ids("<|notimestamps|>") + 1 and not vocab.languages


def _engine(tokenizer) -> SimpleNamespace:
    return SimpleNamespace(processor=SimpleNamespace(tokenizer=tokenizer))


@pytest.mark.parametrize(
    ("script", "seek", "kept"),
    [
        # two complete segments and an unfinished one: seek to the last complete segment's end (12 s)
        ([0, "a", 250, 250, "b", 600, 600, "c"], 1200, [0, "a", 250, 250, "b", 600]),
        # ends on a single timestamp: no speech after it, seek to the window's end
        ([0, "a", 250, 250, "b", 600, 600, "c", 900], N_FRAMES, [0, "a", 250, 250, "b", 600, 600, "c", 900]),
        # no timestamp pair: the whole window is one segment
        ([0, "a", "b"], N_FRAMES, [0, "a", "b"]),
    ],
)
def test_seek_follows_openai(tiny, script, seek, kept) -> None:
    tokenizer = tiny.processor.tokenizer
    vocab = Vocabulary.of(tokenizer, multilingual=False)
    word = {"a": tokenizer.encode(" one", add_special_tokens=False), "b": [], "c": []}
    word["b"], word["c"] = (tokenizer.encode(w, add_special_tokens=False) for w in (" two", " three"))
    tokens = [t for x in script for t in (word[x] if isinstance(x, str) else [vocab.timestamp_begin + x])]
    expected = [t for x in kept for t in (word[x] if isinstance(x, str) else [vocab.timestamp_begin + x])]
    recording = _Recording(np.zeros((80, 2 * N_FRAMES + N_FRAMES), np.float32))
    _advance(recording, Decoded(tuple(tokens), True), vocab, _engine(tokenizer), DecodingOptions())
    assert recording.seek == seek and recording.tokens == expected and recording.windows == 1


def test_empty_segments_are_dropped(tiny) -> None:
    vocab = Vocabulary.of(tiny.processor.tokenizer, multilingual=False)
    begin = vocab.timestamp_begin
    recording = _Recording(np.zeros((80, 3 * N_FRAMES), np.float32))
    _advance(
        recording,
        Decoded((begin, begin + 100, begin + 100), False),
        vocab,
        _engine(tiny.processor.tokenizer),
        DecodingOptions(),
    )
    assert recording.tokens == [] and recording.hit_token_limit and recording.seek == 200  # to <|2.00|>


def test_long_recording_is_transcribed_whole(ct2_int8, recordings) -> None:
    (long, _), (reference, _) = recordings
    [transcript] = transcribe(ct2_int8, [long], DecodingOptions())
    words = len(transcript.text.split())
    assert transcript.windows >= 3 and transcript.decoded_seconds == pytest.approx(len(long) / 16000)
    assert abs(words - 192) <= 19, transcript.text  # within 10% of the reference's 192 words
    score = score_utterance(reference, transcript.text)
    assert score.word_errors / score.ref_words < 0.15 and not transcript.hit_token_limit


def test_batched_long_form_equals_batch_size_one(ct2_int8, recordings, shared_data) -> None:
    clips = open_dataset("librispeech:test-clean", shared_data)
    audios = [recordings[0][0][: 45 * 16000], clips.load_audio(clips.utterances[4]), recordings[0][1]]
    single = [transcribe(ct2_int8, [a], DecodingOptions())[0] for a in audios]
    assert transcribe(ct2_int8, audios, DecodingOptions()) == single
    assert [t.windows for t in single][1] == 1


def test_options_run_and_stay_close(ct2_int8, recordings) -> None:
    (long, _), (reference, _) = recordings
    options = DecodingOptions(beam_size=2, temperature_fallback=True, condition_on_previous_text=True)
    [transcript] = transcribe(ct2_int8, [long[: 45 * 16000]], options)
    again = transcribe(ct2_int8, [long[: 45 * 16000]], options)
    assert [transcript] == again  # seeded: the same run gives the same text
    assert len(transcript.text.split()) > 100


def test_an_engine_without_long_form_is_refused_before_it_runs(shared_data) -> None:
    """No engine of this package lacks long form; one that did would be refused, naming the recording."""
    from whisper_ptq.backends import BACKENDS, named_recipes, register
    from whisper_ptq.backends.reference import ReferenceBackend
    from whisper_ptq.errors import UserError
    from whisper_ptq.preflight import check_decoding

    class ShortOnly(ReferenceBackend):
        library = "short-only"
        long_form = False
        named = {}  # noqa: RUF012 - no named recipes of its own: fp32 stays the reference backend's

    register(ShortOnly())
    try:
        recipe = replace(get_recipe("fp32"), name="short", library="short-only")
        long = open_dataset("librispeech:test-clean+concat:seconds=75,within=dataset", shared_data)
        check_decoding(recipe, DecodingOptions(), [open_dataset("librispeech:test-clean", shared_data)])
        with pytest.raises(UserError, match=r"utterance 1089-134686-0000\.\.1995-1837-0001 of .* lasts 72\.7 s"):
            check_decoding(recipe, DecodingOptions(), [long])
    finally:
        del BACKENDS["short-only"]
        named_recipes.cache_clear()
