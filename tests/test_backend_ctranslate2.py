"""CTranslate2 backend on the packaged tiny.en and real LibriSpeech test-clean utterances.

`test_float32_agrees_with_transformers` is the project's independent cross-check of the pipeline: a
different engine (C++ kernels, its own converter) fed the same features and decoding rules must produce the
same transcripts as the transformers fp32 model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from whisper_ptq.backends import BuildContext, Built, backend_for, get_recipe
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.ct2 import CT2Transcriber
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import WhisperBundle, load_model
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.metrics import corpus_rates, normalize, score_utterance

pytest.importorskip("ctranslate2")

SHORTEST_FIVE = (4, 1, 7, 10, 5)  # indices into the sorted test-clean sample, 2 to 5.4 s each


@pytest.fixture(scope="module")
def bundle(model_cache: Path) -> WhisperBundle:
    # CTranslate2 converts from the bundle's directory and never touches its model: one bundle serves all.
    return load_model("tiny.en", model_cache)


@pytest.fixture(scope="module")
def utterances(shared_data: Path) -> tuple[list[np.ndarray], list[str]]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    chosen = [dataset.utterances[i] for i in SHORTEST_FIVE]
    return [dataset.load_audio(u) for u in chosen], [u.text for u in chosen]


def convert(bundle: WhisperBundle, name: str) -> tuple[Recipe, Built]:
    recipe = get_recipe(name)
    return recipe, backend_for(recipe).quantize(bundle, recipe, BuildContext())


@pytest.fixture(scope="module")
def float32(bundle: WhisperBundle) -> tuple[Recipe, Built]:
    return convert(bundle, "ct2-float32")


@pytest.fixture(scope="module")
def int8(bundle: WhisperBundle) -> tuple[Recipe, Built]:
    return convert(bundle, "ct2-int8")


def wer(references: list[str], hypotheses: list[str]) -> float:
    return corpus_rates(score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))[0]


@pytest.mark.slow
def test_float32_agrees_with_transformers(bundle: WhisperBundle, float32, utterances) -> None:
    audios, references = utterances
    ct2 = float32[1].transcriber.transcribe(audios)
    hf = HFTranscriber(bundle.model, bundle.processor).transcribe(audios)
    same = sum(normalize(a) == normalize(b) for a, b in zip(ct2, hf, strict=True))
    assert same >= 4, list(zip(ct2, hf, strict=True))
    assert wer(references, ct2) < 20


def test_length_limit_matches_transformers(bundle: WhisperBundle, float32, utterances) -> None:
    """A limit short enough to cut the sentence shows both engines stop after the same number of tokens."""
    audio = [utterances[0][4]]  # 5.4 s, about 20 tokens
    limit = 8
    ct2 = dataclasses.replace(float32[1].transcriber, max_length=limit)
    hf = HFTranscriber(bundle.model, bundle.processor, generate_kwargs={"max_length": limit})
    cut = hf.transcribe(audio)
    assert len(bundle.processor.tokenizer(cut[0], add_special_tokens=False).input_ids) == limit
    assert ct2.transcribe(audio) == cut


def test_int8_quantizes_every_weight_matrix(bundle: WhisperBundle, int8, utterances) -> None:
    recipe, quantized = int8
    audios, references = utterances
    assert isinstance(quantized.transcriber, CT2Transcriber)
    assert quantized.info["compute_type"] == "int8_float32"  # what CTranslate2 resolved "int8" to on CPU
    assert quantized.info["stored_dtypes"] == {
        "linear": ["int8"],
        "conv": ["int8"],
        "token_embedding": ["int8"],
    }
    # int8 weights plus one fp32 scale per output row (384 to 1536 inputs per row).
    assert 8.0 < quantized.info["linear_bits_per_weight"] < 8.1
    assert wer(references[:3], quantized.transcriber.transcribe(audios[:3])) < 20


def test_save_is_a_quarter_of_fp32_and_reloads_identically(
    bundle: WhisperBundle, int8, utterances, tmp_path: Path
) -> None:
    recipe, quantized = int8
    backend = backend_for(recipe)
    backend.save(quantized, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model.bin", "config.json", "vocabulary.json"}
    fp32_bytes = sum(p.numel() * 4 for p in bundle.model.parameters())  # tied weights counted once
    assert 0.25 < sum(p.stat().st_size for p in tmp_path.iterdir()) / fp32_bytes < 0.3
    audios = utterances[0][:2]
    reloaded = backend.load(bundle, recipe, tmp_path, BuildContext())
    assert reloaded.transcriber.transcribe(audios) == quantized.transcriber.transcribe(audios)


def test_module_selection_is_refused(bundle: WhisperBundle) -> None:
    recipe = dataclasses.replace(get_recipe("ct2-int8"), modules=("fc1",))
    with pytest.raises(UserError, match="cannot select modules"):
        backend_for(recipe).quantize(bundle, recipe, BuildContext())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ctranslate2:compute_type=int4", "valid: int8, int8_float32, int16, float32"),
        ("ctranslate2:bits=8", "unknown parameter 'bits'"),
    ],
)
def test_bad_parameters_are_refused(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_recipe(spec)


def test_check_names_what_this_machine_lacks() -> None:
    import ctranslate2

    float16 = get_recipe("ct2-float16")
    assert "runs on cuda" in backend_for(float16).check(float16, "cpu")
    int16 = get_recipe("ct2-int16")
    reason = backend_for(int16).check(int16, "cpu")
    if "int16" in ctranslate2.get_supported_compute_types("cpu"):
        assert reason is None
    else:
        assert "CT2_USE_MKL=1" in reason
