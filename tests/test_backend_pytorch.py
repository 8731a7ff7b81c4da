"""PyTorch eager int8 backend on the packaged tiny.en and real LibriSpeech utterances, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_ptq.backends import BuildContext, Built, backend_for, get_recipe
from whisper_ptq.backends.base import directory_bytes
from whisper_ptq.backends.layers import StaticInputLinear
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import load_model
from whisper_ptq.results.metrics import corpus_rates, score_utterance

SHORTEST_TWO = (4, 1)  # indices into the test-clean sample: 2.1 s and 3.3 s
TINY_LINEARS = 65  # 4 encoder layers x 6 + 4 decoder layers x 10 + proj_out
DynamicLinear = torch.ao.nn.quantized.dynamic.Linear


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


def quantize(name: str, cache: Path, ctx: BuildContext | None = None) -> Built:
    recipe = get_recipe(name)
    assert backend_for(recipe).check(recipe, "cpu") is None
    return backend_for(recipe).quantize(load_model("tiny.en", cache), recipe, ctx or BuildContext())


def wer(references: list[str], hypotheses: list[str]) -> float:
    return corpus_rates(score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))[0]


def fp32_and_int8_bytes(model: torch.nn.Module, head_quantized: bool) -> tuple[int, int]:
    """Expected serialized size in fp32, and with every quantized Linear weight at one byte: when the head
    is quantized it is an extra int8 copy, because the fp32 embedding it was tied to is still saved."""
    fp32 = 4 * sum(p.numel() for p in model.parameters())  # tied parameters are listed once
    head = model.proj_out.weight.numel()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head
    return fp32, fp32 - 3 * linear + (head if head_quantized else 0)


def saved_and_reloaded(quantized: Built, name: str, tmp_path: Path, cache: Path) -> tuple[int, Built]:
    recipe = get_recipe(name)
    backend = backend_for(recipe)
    backend.save(quantized, tmp_path)
    return directory_bytes(tmp_path), backend.load(load_model("tiny.en", cache), recipe, tmp_path, BuildContext())


def test_named_recipes() -> None:
    dynamic, per_channel, static = (
        get_recipe(n) for n in ("torch-int8-dynamic", "torch-int8-dynamic-per-channel", "torch-int8-static")
    )
    assert (dynamic.scheme, dynamic.granularity, dynamic.weights) == ("dynamic", "per-tensor", "int8")
    assert per_channel.granularity == "per-channel" and not per_channel.needs_calibration
    assert static.needs_calibration and static.granularity == "per-channel"
    assert all(r.keep == () for r in (dynamic, per_channel, static))


@pytest.mark.parametrize(
    "text, message",
    [
        ("torch:weights=int4", "valid: int8"),
        ("torch:scheme=weight-only", "valid: dynamic, static"),
        ("torch:granularity=per-group", "valid: per-tensor, per-channel"),
        ("torch:group_size=64", "unknown parameter"),
    ],
)
def test_bad_params_are_refused(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_recipe(text)


def test_dynamic_per_tensor_is_the_papers_row(model_cache: Path, utterances, tmp_path: Path) -> None:
    audios, references = utterances
    quantized = quantize("torch-int8-dynamic", model_cache)
    layers = [m for m in quantized.model.modules() if isinstance(m, DynamicLinear)]
    assert len(layers) == TINY_LINEARS == quantized.info["quantized_linear"]
    assert {m.weight().qscheme() for m in layers} == {torch.per_tensor_affine}
    assert quantized.info["quantized_engine"] == torch.backends.quantized.engine
    hypotheses = quantized.transcriber.transcribe(audios)
    assert wer(references, hypotheses) < 25

    size, reloaded = saved_and_reloaded(quantized, "torch-int8-dynamic", tmp_path, model_cache)
    fp32, expected = fp32_and_int8_bytes(load_model("tiny.en", model_cache).model, head_quantized=True)
    assert size == pytest.approx(expected, rel=0.02) and size < 0.85 * fp32
    assert reloaded.transcriber.transcribe(audios) == hypotheses


def test_per_channel_keeping_the_head(model_cache: Path, utterances, tmp_path: Path) -> None:
    audios, references = utterances
    name = "torch:granularity=per-channel,keep=proj_out"
    quantized = quantize(name, model_cache)
    model = quantized.model
    assert type(model.proj_out) is torch.nn.Linear
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    layers = [m for m in model.modules() if isinstance(m, DynamicLinear)]
    assert len(layers) == TINY_LINEARS - 1
    assert {m.weight().qscheme() for m in layers} == {torch.per_channel_affine}
    hypotheses = quantized.transcriber.transcribe(audios)
    assert wer(references, hypotheses) < 25

    size, reloaded = saved_and_reloaded(quantized, name, tmp_path, model_cache)
    _, expected = fp32_and_int8_bytes(load_model("tiny.en", model_cache).model, head_quantized=False)
    assert size == pytest.approx(expected, rel=0.02)
    assert reloaded.transcriber.transcribe(audios) == hypotheses


def test_static_calibrates_input_scales(model_cache: Path, utterances, calibration, tmp_path: Path) -> None:
    audios, references = utterances
    quantized = quantize("torch-int8-static", model_cache, calibration)
    layers = [m for m in quantized.model.modules() if isinstance(m, StaticInputLinear)]
    assert len(layers) == TINY_LINEARS and quantized.info["calibration_utterances"] == 1
    assert len({float(m.input_scale) for m in layers}) > TINY_LINEARS // 2  # really calibrated, per layer
    hypotheses = quantized.transcriber.transcribe(audios)
    assert wer(references, hypotheses) < 40

    _, reloaded = saved_and_reloaded(quantized, "torch-int8-static", tmp_path, model_cache)
    assert reloaded.transcriber.transcribe(audios) == hypotheses


def test_static_without_calibration_is_refused(model_cache: Path) -> None:
    with pytest.raises(UserError, match="needs calibration audio"):
        quantize("torch-int8-static", model_cache)
