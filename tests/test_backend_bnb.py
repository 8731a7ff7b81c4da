"""bitsandbytes backend on the packaged tiny.en and real LibriSpeech test-clean utterances, on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_ptq.backends import BuildContext, Built, backend_for, get_recipe
from whisper_ptq.backends.base import linear_bits_per_weight, linear_layers
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import WhisperBundle, load_model
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.metrics import corpus_rates, score_utterance

bnb = pytest.importorskip("bitsandbytes")

SHORTEST_TWO = (4, 1)  # indices into the sorted test-clean sample: 2.1 s and 3.3 s
# Stored bits per Linear weight as `linear_bits_per_weight` measures them (torch.save of each layer, so about
# 0.05 bit of container overhead): int8 + one fp32 scale per row of 384..1536 inputs; 4 bits + one fp32 absmax
# per 64 weights; with double quantization an 8-bit absmax per 64 weights and one fp32 scale per 16384.
BITS = {"bnb-int8": (8.05, 8.2), "bnb-nf4": (4.5, 4.65), "bnb-fp4": (4.5, 4.65), "bnb-nf4-dq": (4.12, 4.3)}


@pytest.fixture(scope="module")
def utterances(shared_data: Path) -> tuple[list[np.ndarray], list[str]]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    chosen = [dataset.utterances[i] for i in SHORTEST_TWO]
    return [dataset.load_audio(u) for u in chosen], [u.text for u in chosen]


@pytest.fixture
def bundle(model_cache: Path) -> WhisperBundle:
    # Quantization replaces the bundle's modules in place, so every test gets a fresh model.
    return load_model("tiny.en", model_cache)


def quantize(bundle: WhisperBundle, name: str) -> tuple[Recipe, Built]:
    recipe = get_recipe(name)
    return recipe, backend_for(recipe).quantize(bundle, recipe, BuildContext())


def wer(references: list[str], hypotheses: list[str]) -> float:
    return corpus_rates(score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))[0]


@pytest.mark.parametrize("name", list(BITS))
def test_named_recipe_quantizes_every_linear_but_the_head(name: str, bundle: WhisperBundle, utterances) -> None:
    layers = linear_layers(bundle.model)
    recipe, quantized = quantize(bundle, name)
    model = quantized.model
    kind = bnb.nn.Linear8bitLt if recipe.weights == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(model.get_submodule(n), kind) for n in layers)
    assert type(model.proj_out) is torch.nn.Linear
    assert not any(m.training for m in model.modules())  # bnb's CPU inference kernels need eval mode
    assert model.proj_out.weight is model.get_input_embeddings().weight  # still tied, still fp32
    weight = model.get_submodule(next(iter(layers))).weight
    if recipe.weights == "int8":
        assert weight.dtype == torch.int8 and weight.SCB is not None
    else:
        assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == recipe.weights
        assert weight.quant_state.nested == bool(recipe.option("double_quant"))
    low, high = BITS[name]
    assert low < linear_bits_per_weight(model, layers) < high
    audios, references = utterances
    assert wer(references, quantized.transcriber.transcribe(audios)) < 30


@pytest.mark.parametrize("name", ["bnb-int8", "bnb-nf4-dq"])
def test_save_shrinks_the_linears_and_reloads_identically(
    name: str, bundle: WhisperBundle, model_cache: Path, utterances, tmp_path: Path
) -> None:
    linear_weights = sum(linear_layers(bundle.model).values())
    fp32_bytes = sum(p.numel() * 4 for p in bundle.model.parameters())
    recipe, quantized = quantize(bundle, name)
    backend = backend_for(recipe)
    backend.save(quantized, tmp_path)
    saved_bytes = (tmp_path / "model.safetensors").stat().st_size
    bits = BITS[name][1]
    assert saved_bytes < fp32_bytes - linear_weights * (32 - bits) / 8
    audios = utterances[0][:1]
    reloaded = backend.load(load_model("tiny.en", model_cache), recipe, tmp_path, BuildContext())
    assert reloaded.transcriber.transcribe(audios) == quantized.transcriber.transcribe(audios)


def test_fp32_compute_avoids_the_bf16_cpu_kernel(bundle: WhisperBundle, utterances) -> None:
    """bnb's fused AVX512-BF16 CPU kernel computes in bf16; compute_dtype=fp32 must not use it."""
    audio = utterances[0][:1]
    _, fp32 = quantize(bundle, "bnb-nf4")
    fp32.transcriber.transcribe(audio)
    first = next(m for m in fp32.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert not getattr(first.weight.quant_state, "packing_format_for_cpu", False)
    assert fp32.info["kernel_4bit"] == "dequantize + float32 matmul"


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="CPU without AVX512-BF16")
def test_bf16_compute_uses_the_fused_cpu_kernel(
    bundle: WhisperBundle, model_cache: Path, utterances, tmp_path: Path
) -> None:
    audios, references = utterances
    recipe, bf16 = quantize(bundle, "bnb:compute_dtype=bf16")
    backend = backend_for(recipe)
    assert bf16.info["kernel_4bit"].startswith("fused AVX512-BF16")
    backend.save(bf16, tmp_path / "fresh")  # before the kernel repacks the weights
    hypotheses = bf16.transcriber.transcribe(audios)
    assert wer(references, hypotheses) < 30
    first = next(m for m in bf16.model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert first.weight.quant_state.packing_format_for_cpu
    reloaded = backend.load(load_model("tiny.en", model_cache), recipe, tmp_path / "fresh", BuildContext())
    assert reloaded.transcriber.transcribe(audios) == hypotheses
    with pytest.raises(UserError, match="save before transcribing"):
        backend.save(bf16, tmp_path / "repacked")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bnb:format=int3", "valid: int8, nf4, fp4"),
        ("bnb:format=int4", "valid: int8, nf4, fp4"),
        ("bnb:format=int8,double_quant=true", "double_quant applies to the 4-bit formats"),
        ("bnb:format=int8,compute_dtype=bf16", "compute_dtype applies to the 4-bit formats"),
        ("bnb:format=nf4,threshold=4", "threshold applies to format=int8 only"),
        ("bnb:blocksize=100", "valid: 32, 64, 128, 256"),
        ("bnb:bits=3", "unknown parameter 'bits'"),
    ],
)
def test_bad_parameters_are_refused(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_recipe(spec)
