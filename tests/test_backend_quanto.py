"""Optimum-Quanto backend on the packaged tiny.en and real LibriSpeech utterances, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_ptq.backends import BuildContext, Built, backend_for, get_recipe
from whisper_ptq.backends.base import directory_bytes, linear_bits_per_weight, linear_layers
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import load_model
from whisper_ptq.results.metrics import corpus_rates, score_utterance

quanto = pytest.importorskip("optimum.quanto")

SHORTEST_TWO = (4, 1)  # indices into the test-clean sample: 2.1 s and 3.3 s
NAMED = (
    "quanto-int8",
    "quanto-int4",
    "quanto-int2",
    "quanto-fp8",
    "quanto-int8-fp8-static",
    "quanto-int8-int8-static",
)
# The paper's static row, with the LM head quantized too: the configuration that used to fail in generate.
STATIC_WITH_HEAD = "quanto:weights=int8,activations=fp8,keep=none"


@pytest.fixture(scope="module")
def utterances(shared_data: Path) -> tuple[list[np.ndarray], list[str]]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    chosen = [dataset.utterances[i] for i in SHORTEST_TWO]
    return [dataset.load_audio(u) for u in chosen], [u.text for u in chosen]


@pytest.fixture(scope="module")
def calibration(shared_data: Path) -> BuildContext:
    dataset = open_dataset("librispeech:train-clean-100", shared_data).limit(1)
    audios = [dataset.load_audio(u) for u in dataset.utterances]
    return BuildContext(calibration=lambda: audios, calibration_spec=dataset.spec)


@pytest.fixture(scope="module")
def static(model_cache: Path, calibration: BuildContext, utterances) -> tuple[Built, list[str]]:
    """The static recipe with its head quantized, and its transcripts (quantized and run once: slow)."""
    recipe = get_recipe(STATIC_WITH_HEAD)
    quantized = backend_for(recipe).quantize(load_model("tiny.en", model_cache), recipe, calibration)
    return quantized, quantized.transcriber.transcribe(utterances[0])


def wer(references: list[str], hypotheses: list[str]) -> float:
    return corpus_rates(score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))[0]


def test_named_recipes() -> None:
    recipes = {name: get_recipe(name) for name in NAMED}
    assert {r.scheme for n, r in recipes.items() if "static" not in n} == {"weight-only"}
    assert all(recipes[n].needs_calibration for n in NAMED if "static" in n)
    assert recipes["quanto-int8-fp8-static"].activations == "fp8"
    assert recipes["quanto-int4"].granularity == "per-group"
    assert all(r.keep == ("proj_out",) for r in recipes.values())


@pytest.mark.parametrize(
    "text, message",
    [
        ("quanto:weights=int3", "valid: int8, int4, int2, fp8"),
        ("quanto:weights=int4,activations=int8", "only with 8-bit weights"),
        ("quanto:activations=int4", "valid: None, int8, fp8"),
        ("quanto:group_size=64", "unknown parameter"),
    ],
)
def test_bad_params_are_refused(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_recipe(text)


@pytest.mark.slow
def test_weight_only_keeps_the_tied_head_and_stores_8_bits(model_cache: Path, tmp_path: Path) -> None:
    bundle = load_model("tiny.en", model_cache)
    layers = linear_layers(bundle.model)
    fp32_bytes = sum(p.numel() * 4 for p in bundle.model.parameters())
    recipe = get_recipe("quanto-int8")
    backend = backend_for(recipe)
    quantized = backend.quantize(bundle, recipe, BuildContext())
    model = quantized.model
    assert all(isinstance(model.get_submodule(n), quanto.QLinear) for n in layers)
    assert all(model.get_submodule(n).weight.qtype == quanto.qint8 for n in layers)
    assert type(model.proj_out) is torch.nn.Linear
    assert model.proj_out.weight is model.get_input_embeddings().weight
    assert 8.0 < linear_bits_per_weight(model, layers) < 8.2  # + one fp32 scale per output row
    backend.save(quantized, tmp_path)
    # Each Linear weight drops from 4 bytes to 1 (+ scales); everything else stays fp32 and is stored once.
    expected = fp32_bytes - 3 * sum(layers.values())
    assert abs(directory_bytes(tmp_path) - expected) < 0.01 * expected


@pytest.mark.slow
def test_static_with_quantized_head_transcribes(static, utterances) -> None:
    quantized, hypotheses = static
    model = quantized.model
    layer = model.model.encoder.layers[0].fc1
    assert isinstance(layer, quanto.QLinear) and layer.activation_qtype == quanto.qfloat8
    assert layer.input_scale.item() != 1.0  # calibrated, not the initial value
    # The head quantizes its weights but never its output: float logits are what generate's
    # torch.where(mask, -inf, logits) and the greedy argmax need.
    assert model.proj_out.weight.qtype == quanto.qint8 and model.proj_out.activation_qtype is None
    assert quantized.info["calibration_utterances"] == 1
    assert quantized.info["attn_implementation"] == "sdpa"
    assert wer(utterances[1], hypotheses) < 30


@pytest.mark.slow
def test_static_save_load_gives_identical_transcripts(static, utterances, model_cache, tmp_path) -> None:
    quantized, hypotheses = static
    recipe = get_recipe(STATIC_WITH_HEAD)
    backend = backend_for(recipe)
    backend.save(quantized, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "quanto_qmap.json",
        "streamline.json",
    }
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False  # head quantized
    reloaded = backend.load(load_model("tiny.en", model_cache), recipe, tmp_path, BuildContext())
    assert reloaded.transcriber.transcribe(utterances[0]) == hypotheses


def test_quantized_logits_break_generate_where() -> None:
    """Pins the root cause the backend works around: a QLinear with activations returns quantized
    outputs, and quanto's `where` refuses one in the `other` slot, as transformers' logits processors pass
    the logits. If quanto starts accepting it, the head could quantize its activations again."""
    layer = torch.nn.Sequential(torch.nn.Linear(16, 16))  # quanto.quantize swaps children, not the root
    quanto.quantize(layer, weights=quanto.qint8, activations=quanto.qint8)
    quanto.freeze(layer)
    with torch.no_grad():
        logits = layer(torch.randn(2, 16))
    assert isinstance(logits, quanto.QTensor)
    with pytest.raises(NotImplementedError):
        torch.where(torch.zeros(2, 16, dtype=torch.bool), -float("inf"), logits)


def test_int4_runs_under_no_grad_not_inference_mode() -> None:
    """Why `HFTranscriber` generates under `torch.no_grad()`: a frozen int4 QLinear transposes its weight
    through the QTensor fallback, which creates a plain tensor; under inference mode that tensor is an
    inference tensor, and autograd's view tracking cannot give it the weight's version counter."""
    layer = torch.nn.Sequential(torch.nn.Linear(256, 256))
    quanto.quantize(layer, weights=quanto.qint4)
    quanto.freeze(layer)
    x = torch.randn(1, 256)
    with torch.no_grad():
        assert layer(x).shape == (1, 256)
    with pytest.raises(RuntimeError, match="version_counter"), torch.inference_mode():
        layer(x)
