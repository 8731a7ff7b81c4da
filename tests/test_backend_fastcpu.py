"""The fast CPU engine and its backend on the packaged tiny.en and real LibriSpeech utterances.

Compilation (`compile=true`, the `fast-cpu` default) takes a minute and is exercised by benchmarks/speed.py;
these tests run the same engine eagerly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_ptq.backends import BuildContext, Built, backend_for, get_recipe
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.fast import Int8Linear, keep_rows, quantize_rows
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.errors import UserError
from whisper_ptq.evaluation import Quantized
from whisper_ptq.models.loading import load_model
from whisper_ptq.results.metrics import corpus_rates, score_utterance
from whisper_ptq.settings import Settings

EAGER_INT8 = "fast:keep=encoder-first-attention,compile=false,attention=sdpa"  # fast-cpu, eager
UTTERANCES = (4, 1, 0)  # test-clean sample: 2.1 s, 3.3 s and a longer one


@pytest.fixture(scope="module")
def utterances(shared_data: Path) -> tuple[list[np.ndarray], list[str]]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    chosen = [dataset.utterances[i] for i in UTTERANCES]
    return [dataset.load_audio(u) for u in chosen], [u.text for u in chosen]


@pytest.fixture(scope="module")
def fp32_texts(model_cache: Path, utterances) -> list[str]:
    bundle = load_model("tiny.en", model_cache)
    return [HFTranscriber(bundle.model, bundle.processor).transcribe([a])[0] for a in utterances[0]]


def quantize(text: str, cache: Path) -> Built:
    r = get_recipe(text)
    assert backend_for(r).check(r, "cpu") is None
    return backend_for(r).quantize(load_model("tiny.en", cache), r, BuildContext())


def wer(references: list[str], hypotheses: list[str]) -> float:
    return corpus_rates(score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))[0]


def test_int8_linear_matches_float_linear_closely() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    expected = linear(x)
    got = Int8Linear(linear.weight, linear.bias)(x)
    assert got.shape == expected.shape
    assert (got - expected).norm() / expected.norm() < 0.02
    # per-row scales: a row's result does not depend on the other rows (batched == batch-1)
    assert torch.equal(Int8Linear(linear.weight, linear.bias)(x[:1]), got[:1])


def test_quantize_rows_keeps_zero_rows_finite() -> None:
    values, scales = quantize_rows(torch.zeros(2, 8))
    assert torch.equal(values, torch.zeros(2, 8, dtype=torch.int8)) and torch.isfinite(scales).all()


def test_keep_rows_moves_the_kept_rows_forward_in_place() -> None:
    cache = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
    expected = cache[[1, 2, 4]].clone()
    [kept] = keep_rows([cache], [1, 2, 4])
    assert torch.equal(kept, expected)
    assert kept.data_ptr() == cache.data_ptr()  # a view of the same storage, nothing allocated


def test_fp32_engine_transcribes_exactly_like_transformers(model_cache: Path, utterances, fp32_texts) -> None:
    """Same weights, same decoding rules: the lean loop must give transformers' greedy output verbatim."""
    transcriber = quantize("fast-cpu-fp32", model_cache).transcriber
    assert [transcriber.transcribe([a])[0] for a in utterances[0]] == fp32_texts


def test_int8_engine_is_close_to_fp32_and_batch_invariant(model_cache: Path, utterances, fp32_texts) -> None:
    audios, references = utterances
    transcriber = quantize(EAGER_INT8, model_cache).transcriber
    single = [transcriber.transcribe([a])[0] for a in audios]
    assert abs(wer(references, single) - wer(references, fp32_texts)) <= 10.0
    assert sum(s.strip() == f.strip() for s, f in zip(single, fp32_texts, strict=True)) >= 2
    assert transcriber.transcribe(audios) == single


def test_knobs_are_recorded_in_the_session_info(model_cache: Path) -> None:
    session = Quantized.build("tiny.en", get_recipe(EAGER_INT8), Settings(cache_dir=model_cache, threads=1))
    info = session.info
    assert info["engine"].startswith("whisper_ptq.engines.fast") and info["compiled"] is False
    # tiny.en: 4 encoder + 4 decoder layers; the first encoder layer's fused q/k/v and out stay fp32
    assert (info["int8_linear"], info["fp32_linear"]) == (4 * 4 + 4 * 7 - 2, 2)
    assert info["decoder_threads"] == 1 and "re-scored in fp32" in info["lm_head"]
    assert 8 < info["linear_bits_per_weight"] < 32 and info["size_reduction"] > 0
    assert info["recipe_spec"]["granularity"] == "per-token"


def test_named_recipes_and_refusals() -> None:
    fast = get_recipe("fast-cpu")
    assert fast.library == "fast" and fast.option("compile") is True and fast.keep
    assert get_recipe("fast-cpu-fp32").weights == "fp32"
    with pytest.raises(UserError, match="decoder_threads must be 0 or more"):
        get_recipe("fast:decoder_threads=-1")
    with pytest.raises(UserError, match="keep and sensitive apply to weights=int8 only"):
        get_recipe("fast:weights=fp32,keep=encoder-first-layer")


@pytest.mark.parametrize(
    "flags, slow",
    [
        (["avx2", "fma"], ("no VNNI", "no native bf16")),  # an AVX2-only EPYC, where fast-cpu was 15x slower
        (["avx2", "avx512f", "avx512_vnni"], ("no native bf16",)),  # Cascade Lake: VNNI without bf16
        (["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"], ()),  # Sapphire Rapids
    ],
)
def test_a_cpu_without_the_kernels_instructions_is_named_in_list(flags, slow, monkeypatch, capsys) -> None:
    """The CPU decides whether fast-cpu's int8 GEMMs and bf16 attention beat fp32; `list` says when they
    cannot, and fp32 linears with fp32 attention need nothing."""
    import json

    from whisper_ptq.backends import fastcpu
    from whisper_ptq.cli import main

    monkeypatch.setattr(fastcpu, "cpu_flags", lambda: flags)  # this machine's own CPU cannot change
    assert main(["list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    note = rows["fast-cpu"]["slow_here"] or ""
    assert all(part in note for part in slow) and bool(note) == bool(slow)
    assert (
        backend_for(get_recipe("fast:attention=sdpa,weights=fp32")).slow_here(
            get_recipe("fast:attention=sdpa,weights=fp32"), "cpu"
        )
        is None
    )
