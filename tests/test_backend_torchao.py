"""torchao backend on the packaged tiny.en and real LibriSpeech utterances, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_ptq.backends import BuildContext, Built, backend_for, get_recipe
from whisper_ptq.backends.base import directory_bytes
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import load_model
from whisper_ptq.results.metrics import corpus_rates, score_utterance

pytest.importorskip("torchao")

SHORTEST = 4  # index into the test-clean sample: 2.1 s ("he could wait no longer")
SECOND_SHORTEST = 1  # 3.3 s
TINY_LINEARS = 65  # 4 encoder layers x 6 + 4 decoder layers x 10 + proj_out


@pytest.fixture(scope="module")
def utterances(shared_data: Path) -> tuple[list[np.ndarray], list[str]]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    chosen = [dataset.utterances[i] for i in (SHORTEST, SECOND_SHORTEST)]
    return [dataset.load_audio(u) for u in chosen], [u.text for u in chosen]


def quantize(name: str, cache: Path) -> Built:
    recipe = get_recipe(name)
    assert backend_for(recipe).check(recipe, "cpu") is None
    return backend_for(recipe).quantize(load_model("tiny.en", cache), recipe, BuildContext())


def wer(references: list[str], hypotheses: list[str]) -> float:
    return corpus_rates(score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))[0]


def weight_types(model: torch.nn.Module) -> dict[str, str]:
    return {n: type(m.weight).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_named_recipes() -> None:
    dynamic, int8, int4 = (
        get_recipe(n) for n in ("torchao-int8-dynamic", "torchao-int8-weight-only", "torchao-int4-weight-only")
    )
    assert (dynamic.scheme, dynamic.activations) == ("dynamic", "int8")
    assert (int8.scheme, int8.weights, int8.group_size) == ("weight-only", "int8", None)
    assert (int4.weights, int4.group_size, int4.granularity) == ("int4", 128, "per-group")
    # ATen's int4 CPU packing cannot hold the 51864-row LM head, so int4 always keeps it
    assert int4.keep == ("proj_out",) and get_recipe("torchao:mode=int4-weight-only").keep == ("proj_out",)
    assert int4.option("compute_dtype") == "bf16" and dynamic.option("compute_dtype") == "fp32"


@pytest.mark.parametrize(
    "text, message",
    [
        ("torchao:mode=int4-weight-only,group_size=48", "valid: 32, 64, 128"),
        ("torchao:mode=int8-dynamic,group_size=64", "group_size applies to mode=int4-weight-only only"),
        ("torchao:mode=int2", "valid: int8-dynamic, int8-weight-only, int4-weight-only"),
        ("torchao:nbits=4", "unknown parameter"),
    ],
)
def test_bad_params_are_refused(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_recipe(text)


def test_int8_dynamic(model_cache: Path, utterances) -> None:
    audios, references = utterances
    quantized = quantize("torchao-int8-dynamic", model_cache)
    types = weight_types(quantized.model)
    assert set(types.values()) == {"Int8Tensor"} and len(types) == TINY_LINEARS
    # dynamic: the weight carries the per-token activation quantization it applies at each call
    assert quantized.model.model.encoder.layers[0].fc1.weight.act_quant_kwargs is not None
    # eager torchao int8 is slow on CPU (it is built for torch.compile): one 2 s utterance only
    assert wer(references[:1], quantized.transcriber.transcribe(audios[:1])) < 25


def test_int8_weight_only_save_load(model_cache: Path, utterances, tmp_path: Path) -> None:
    audios, references = utterances
    quantized = quantize("torchao-int8-weight-only", model_cache)
    weight = quantized.model.model.encoder.layers[0].fc1.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.act_quant_kwargs is None
    assert quantized.info["proj_out"].startswith("quantized")
    hypotheses = quantized.transcriber.transcribe(audios[:1])
    assert wer(references[:1], hypotheses) < 25

    recipe = get_recipe("torchao-int8-weight-only")
    backend_for(recipe).save(quantized, tmp_path)
    fp32 = 4 * sum(p.numel() for p in load_model("tiny.en", model_cache).model.parameters())
    # 64 Linears at ~1 byte per weight plus an int8 copy of the head (the fp32 embedding stays): ~0.8 x fp32
    assert 0.75 * fp32 < directory_bytes(tmp_path) < 0.85 * fp32
    reloaded = backend_for(recipe).load(load_model("tiny.en", model_cache), recipe, tmp_path, BuildContext())
    assert reloaded.transcriber.transcribe(audios[:1]) == hypotheses


def test_int4_weight_only_save_load(model_cache: Path, utterances, tmp_path: Path) -> None:
    audios, references = utterances
    quantized = quantize("torchao-int4-weight-only", model_cache)
    model = quantized.model
    types = weight_types(model)
    assert types.pop("proj_out") == "Parameter" and set(types.values()) == {"Int4OpaqueTensor"}
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert quantized.info["quantized_linear"] == TINY_LINEARS - 1
    hypotheses = quantized.transcriber.transcribe(audios)
    assert wer(references, hypotheses) < 30

    recipe = get_recipe("torchao-int4-weight-only")
    backend_for(recipe).save(quantized, tmp_path)
    fp32 = 4 * sum(p.numel() for p in load_model("tiny.en", model_cache).model.parameters())
    # bf16 model, Linears at 4 bits + bf16 scale and zero per 128 weights: about a third of fp32
    assert directory_bytes(tmp_path) < 0.36 * fp32
    reloaded = backend_for(recipe).load(load_model("tiny.en", model_cache), recipe, tmp_path, BuildContext())
    assert reloaded.transcriber.transcribe(audios) == hypotheses
