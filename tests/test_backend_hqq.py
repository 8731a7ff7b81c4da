"""HQQ backend on the packaged tiny.en and real LibriSpeech test-clean utterances, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_ptq.backends import BuildContext, Built, backend_for, get_recipe
from whisper_ptq.backends.base import directory_bytes, linear_bits_per_weight
from whisper_ptq.backends.hqq import hqq_linear, quant_config
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import load_model
from whisper_ptq.results.metrics import corpus_rates, score_utterance

hqq_quantize = pytest.importorskip("hqq.core.quantize")

SHORTEST_TWO = (4, 1)  # indices into the test-clean sample: 2.1 s and 3.3 s
NAMED = {"hqq-int8": (8, 64), "hqq-int4": (4, 64), "hqq-int3": (3, 64), "hqq-int2": (2, 32)}


@pytest.fixture(scope="module")
def utterances(shared_data: Path) -> tuple[list[np.ndarray], list[str]]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    chosen = [dataset.utterances[i] for i in SHORTEST_TWO]
    return [dataset.load_audio(u) for u in chosen], [u.text for u in chosen]


@pytest.fixture(scope="module")
def int4(model_cache: Path, utterances) -> tuple[Built, list[str], int]:
    """hqq-int4 on tiny.en, its transcripts and the fp32 parameter bytes (quantized and run once: slow)."""
    bundle = load_model("tiny.en", model_cache)
    fp32_bytes = sum(p.numel() * 4 for p in bundle.model.parameters())
    recipe = get_recipe("hqq-int4")
    quantized = backend_for(recipe).quantize(bundle, recipe, BuildContext())
    return quantized, quantized.transcriber.transcribe(utterances[0]), fp32_bytes


def wer(references: list[str], hypotheses: list[str]) -> float:
    return corpus_rates(score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))[0]


def test_named_recipes() -> None:
    for name, (nbits, group_size) in NAMED.items():
        recipe = get_recipe(name)
        assert (recipe.weights, recipe.group_size) == (f"int{nbits}", group_size)
        assert recipe.scheme == "weight-only" and not recipe.needs_calibration
        assert recipe.keep == ("proj_out",) and recipe.option("axis") == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("hqq:nbits=5", "valid: 8, 4, 3, 2"),
        ("hqq:group_size=48", "valid: 32, 64, 128"),
        ("hqq:axis=2", "valid: 0, 1"),
        ("hqq:nbits=four", "is not a int"),
        ("hqq:weights=int4", "unknown parameter"),
    ],
)
def test_bad_params_are_refused(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_recipe(text)


@pytest.mark.slow
def test_int4_replaces_every_linear_but_the_tied_head(int4, utterances) -> None:
    quantized, hypotheses, _ = int4
    model = quantized.model
    # HQQLinear is no nn.Linear subclass: the head is the only nn.Linear left.
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] == ["proj_out"]
    assert model.proj_out.weight is model.get_input_embeddings().weight
    hqq_layers = [m for m in model.modules() if isinstance(m, hqq_quantize.HQQLinear)]
    assert len(hqq_layers) == quantized.info["hqq_linear"] == 64  # 4 encoder x 6 + 4 decoder x 10
    assert {(m.meta["nbits"], m.meta["group_size"], m.meta["axis"]) for m in hqq_layers} == {(4, 64, 1)}
    assert quantized.info["kernel"] == "HQQBackend.PYTORCH"
    assert wer(utterances[1], hypotheses) < 30


@pytest.mark.slow
def test_int4_save_is_5_bits_per_weight_and_reloads_identically(int4, utterances, model_cache, tmp_path) -> None:
    quantized, hypotheses, fp32_bytes = int4
    recipe = get_recipe("hqq-int4")
    backend = backend_for(recipe)
    model = quantized.model
    names = [n for n, m in model.named_modules() if isinstance(m, hqq_quantize.HQQLinear)]
    weights = {n: model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names}
    # 4 bits + an fp32 scale and an fp32 zero per 64 weights = 5 bits, plus HQQ's per-layer metadata.
    assert 5.0 < linear_bits_per_weight(model, weights) < 5.3
    backend.save(quantized, tmp_path)
    assert directory_bytes(tmp_path) < fp32_bytes - sum(weights.values()) * 4 * (1 - 5.3 / 32)
    reloaded = backend.load(load_model("tiny.en", model_cache), recipe, tmp_path, BuildContext())
    assert reloaded.transcriber.transcribe(utterances[0]) == hypotheses


@pytest.mark.parametrize("nbits, group_size, axis", [(3, 64, 1), (2, 32, 0), (8, 128, 1)])
def test_layer_state_dict_round_trip(nbits: int, group_size: int, axis: int) -> None:
    """Each bit width packs differently (3-bit: 10 values per int32); what HQQLinear saves restores the
    same weights and outputs."""
    recipe = get_recipe(f"hqq:nbits={nbits},group_size={group_size},axis={axis}")
    linear = torch.nn.Linear(384, 1536)
    layer = hqq_linear(linear, quant_config(recipe), "cpu")
    restored = hqq_linear(None, None, "cpu")
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(3, 384)
    with torch.no_grad():
        assert torch.equal(restored.dequantize(), layer.dequantize())
        assert torch.equal(restored(x), layer(x))
