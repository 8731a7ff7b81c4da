"""The fast CPU engine and its backend on the packaged tiny.en and real LibriSpeech utterances, with every kernel
plan this machine's CPU can run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_ptq.backends import BACKENDS, BuildContext, Built, backend_for, get_recipe
from whisper_ptq.backends.fastcpu import KERNEL_PLANS, RUNTIME_FOR_CLASS, cpu_shortfall, fast_cpu_here, plan_for
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.decoding import keep_rows
from whisper_ptq.engines.fast import DynamicInt8Linear, quantize_rows
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.errors import UserError
from whisper_ptq.evaluation import Quantized
from whisper_ptq.models.loading import load_model
from whisper_ptq.results import environment
from whisper_ptq.results.environment import cpu_class, has_class
from whisper_ptq.results.metrics import corpus_rates, score_utterance
from whisper_ptq.settings import Settings

ENGINE_INT8 = "fast:cpu=auto"  # the fast engine with this CPU's plan (fast-cpu may be a runtime's recipe here)
# The plans this CPU has the instructions for (all three on an AMX Xeon; avx2 and portable on an AVX2 EPYC).
RUNNABLE_PLANS = [name for name in KERNEL_PLANS if has_class(cpu_class(), name)]
# Without VNNI, 8-bit multiply-adds saturate: fbgemm's 8-bit path returns wrong sums (relative error 7.5% on the
# tests' layer under ONEDNN_MAX_CPU_ISA=AVX2): no plan uses it there.
VNNI = has_class(cpu_class(), "avx512-vnni")


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


def test_fbgemm_int8_linear_matches_float_linear_and_survives_a_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    expected = linear(x)
    for seven_bit in (False, True) if VNNI else (True,):
        got = DynamicInt8Linear(linear.weight, linear.bias, seven_bit)(x)
        assert (got - expected).norm() / expected.norm() < (0.03 if seven_bit else 0.02)
    # a saved engine is rebuilt from other weights and loaded: the packed fbgemm weight must follow its buffers
    saved = DynamicInt8Linear(linear.weight, linear.bias)
    rebuilt = DynamicInt8Linear(torch.randn(32, 64), torch.zeros(32))
    rebuilt.load_state_dict(saved.state_dict())
    assert torch.equal(rebuilt(x), saved(x))


def test_fbgemm_per_row_scales_keep_quiet_rows_apart_from_loud_ones() -> None:
    """`per_row`: each row gets its own activation scale, as the AVX2 encoder's 1500 frames need (speech next
    to padding): rows next to rows 100x louder keep fp32's values far better than under one scale for all, and
    as well as alone; the bias is added once, after the rows are scaled back."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.cat([100 * torch.randn(4, 64), torch.randn(6, 64)])
    expected = linear(x).detach()
    per_row = DynamicInt8Linear(linear.weight, linear.bias, seven_bit=True, per_row=True)
    got = per_row(x)
    one_scale = DynamicInt8Linear(linear.weight, linear.bias, seven_bit=True)(x)

    def quiet_error(y: torch.Tensor) -> float:
        return float((y[4:] - expected[4:]).norm() / expected[4:].norm())

    assert quiet_error(got) < 0.03 < 0.3 < quiet_error(one_scale)
    alone = per_row(x[4:])
    assert float((got[4:] - alone).norm() / alone.norm()) < 0.03
    assert float((got[:4] - expected[:4]).norm() / expected[:4].norm()) < 0.03
    # a saved engine reloads the per-row linear's buffers and repacks them without the bias
    rebuilt = DynamicInt8Linear(torch.randn(32, 64), torch.zeros(32), seven_bit=True, per_row=True)
    rebuilt.load_state_dict(per_row.state_dict())
    assert torch.equal(rebuilt(x), got)


def test_quantize_rows_keeps_zero_rows_finite() -> None:
    values, scales = quantize_rows(torch.zeros(2, 8))
    assert torch.equal(values, torch.zeros(2, 8, dtype=torch.int8)) and torch.isfinite(scales).all()


@pytest.mark.parametrize("as_array", [lambda t: t, lambda t: t.numpy()], ids=["torch", "numpy"])
def test_keep_rows_moves_the_kept_rows_forward_in_place(as_array) -> None:
    """The fast engine's caches are torch tensors, the runtimes' graphs' numpy arrays."""
    cache = as_array(torch.arange(5 * 3 * 2, dtype=torch.float32).view(5, 3, 2))
    expected = cache[[1, 2, 4]].copy() if isinstance(cache, np.ndarray) else cache[[1, 2, 4]].clone()
    [kept] = keep_rows([cache], [1, 2, 4])
    assert (kept == expected).all() and kept.shape == (3, 3, 2)
    assert torch.as_tensor(kept).data_ptr() == torch.as_tensor(cache).data_ptr()  # a view: nothing allocated


def test_fp32_engine_transcribes_exactly_like_transformers(model_cache: Path, utterances, fp32_texts) -> None:
    """Same weights, same decoding rules: the lean loop must give transformers' greedy output verbatim."""
    transcriber = quantize("fast-cpu-fp32", model_cache).transcriber
    assert [transcriber.transcribe([a])[0] for a in utterances[0]] == fp32_texts


@pytest.mark.parametrize("plan", RUNNABLE_PLANS)
def test_every_plan_this_cpu_runs_is_close_to_fp32(plan: str, model_cache: Path, utterances, fp32_texts) -> None:
    """Every CPU class's kernels, where this CPU has their instructions: near fp32's words, and a batch gives
    near the same text as one utterance at a time (the fbgemm decoder shares an activation scale per call)."""
    audios, references = utterances
    transcriber = quantize(f"fast:cpu={plan}", model_cache).transcriber
    single = [transcriber.transcribe([a])[0] for a in audios]
    assert abs(wer(references, single) - wer(references, fp32_texts)) <= 10.0
    assert sum(s.strip() == f.strip() for s, f in zip(single, fp32_texts, strict=True)) >= 2
    batched = transcriber.transcribe(audios)
    assert sum(b == s for b, s in zip(batched, single, strict=True)) >= 2


def test_knobs_are_recorded_in_the_session_info(model_cache: Path) -> None:
    session = Quantized.build("tiny.en", get_recipe(ENGINE_INT8), Settings(cache_dir=model_cache, threads=1))
    info = session.info
    plan = KERNEL_PLANS[info["kernel_plan"]["name"]]
    assert info["cpu_class"] == cpu_class() and info["kernel_plan"]["name"] == plan_for(cpu_class())
    assert info["kernel_plan"]["decoder"] == plan.decoder and info["engine"].startswith("whisper_ptq.engines.fast")
    # tiny.en: 4 decoder layers of 7 fused linears, int8 but on the portable plan; 4 encoder layers of 4, int8
    # (but the first layer's fused q/k/v and out) on the int8-encoder plans
    decoder_int8 = 0 if plan.decoder == "fp32" else 4 * 7
    encoder_int8 = 4 * 4 - 2 if plan.encoder.startswith("int8") else 0
    assert (info["int8_linear"], info["float_linear"]) == (
        decoder_int8 + encoder_int8,
        8 * 4 + 4 * 3 - decoder_int8 - encoder_int8,
    )
    assert info["decoder_threads"] == 1 and ("re-scored in fp32" in info["lm_head"]) == (plan.decoder != "fp32")
    assert info["size_reduction"] > 0 or plan.decoder == "fp32"


def test_named_recipes_and_refusals() -> None:
    fast = get_recipe("fast:cpu=auto")
    assert fast.library == "fast" and fast.option("cpu") == plan_for(cpu_class())  # auto: decided, and stored, here
    assert get_recipe("fast-cpu-fp32").weights == "fp32"
    with pytest.raises(UserError, match="decoder_threads must be 0 or more"):
        get_recipe("fast:decoder_threads=-1")
    with pytest.raises(UserError, match="cpu"):
        get_recipe("fast:cpu=arm9")


ZEN4 = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
SAPPHIRE_RAPIDS = [*ZEN4, "amx_bf16", "amx_int8"]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["avx2", "fma"], "avx2"),  # the AVX2-only EPYC where the AVX-512 plan ran 15x slower than fp32
        (["avx2", "fma", "avx512f"], "avx2"),  # Skylake-SP: AVX-512 without VNNI
        (["avx2", "fma", "avx512f", "avx512_vnni"], "avx512-vnni"),  # Cascade Lake
        (ZEN4, "avx512-bf16"),
        (SAPPHIRE_RAPIDS, "amx"),
        (["neon", "asimd"], "portable"),
    ],
)
def test_cpu_class_of_flags(flags, expected, no_isa_caps) -> None:
    assert cpu_class(flags) == expected


def test_isa_caps_lower_the_class_as_the_libraries_do(monkeypatch, no_isa_caps) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert cpu_class(SAPPHIRE_RAPIDS) == "avx512-vnni"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert cpu_class(SAPPHIRE_RAPIDS) == "avx2"  # the lowest cap wins


@pytest.mark.parametrize(
    "flags, library",
    [
        (["avx2", "fma"], "fast"),
        (["avx2", "fma", "avx512f", "avx512_vnni"], "openvino"),  # Cascade Lake
        (ZEN4, "openvino"),
        (SAPPHIRE_RAPIDS, "fast"),
    ],
)
def test_fast_cpu_is_the_recipe_measured_fastest_on_the_cpu_class(flags, library, monkeypatch, no_isa_caps) -> None:
    """Where a runtime's int8 beat the fast engine's plan (OpenVINO on AVX-512 VNNI and on AVX-512 BF16 without
    AMX), fast-cpu is that runtime's recipe, named fast-cpu; on AMX and AVX2 it is the fast engine with the
    class's plan."""
    monkeypatch.setattr(environment, "cpu_flags", lambda: flags)
    recipes = {name: r for backend in BACKENDS.values() for name, r in backend.named_recipes().items()}
    chosen = fast_cpu_here(recipes)
    assert chosen.name == "fast-cpu" and chosen.library == library
    if library == "fast":
        assert chosen.option("cpu") == plan_for(cpu_class(flags))
    else:
        runtime = RUNTIME_FOR_CLASS[cpu_class(flags)]
        assert chosen.to_dict() | {"name": runtime, "description": ""} == recipes[runtime].to_dict() | {
            "description": ""
        }


@pytest.mark.parametrize(
    "flags, plan, runnable",
    [
        (ZEN4, "avx2", ["avx2", "portable"]),  # AVX-512 CPUs without AMX run the AVX2 plan, and are not warned
        (SAPPHIRE_RAPIDS, "amx", ["amx", "avx2", "portable"]),
        (["avx2", "fma"], "avx2", ["avx2", "portable"]),
        (["neon", "asimd"], "portable", ["portable"]),
    ],
)
def test_a_cpu_runs_the_best_plan_it_has_the_instructions_for(flags, plan, runnable, monkeypatch, no_isa_caps):
    monkeypatch.setattr(environment, "cpu_flags", lambda: flags)
    assert plan_for(cpu_class()) == plan
    assert [name for name in KERNEL_PLANS if cpu_shortfall(get_recipe(f"fast:cpu={name}")) is None] == runnable


def test_a_plan_this_cpu_lacks_the_instructions_for_is_named_slow(monkeypatch, capsys, no_isa_caps) -> None:
    """A recipe made on an AMX machine (stored with cpu=amx) and run on an AVX2 one says why it is slow, in
    `list` and before a run; this CPU's own plan, and fp32, never do."""
    import json

    from whisper_ptq.cli import main

    monkeypatch.setattr(environment, "cpu_flags", lambda: ["avx2", "fma"])  # this machine's own CPU cannot change
    note = cpu_shortfall(get_recipe("fast:cpu=amx"))
    assert note and "'amx'" in note and "'avx2'" in note and "cpu=auto" in note
    assert cpu_shortfall(get_recipe("fast:cpu=avx2")) is None
    assert cpu_shortfall(get_recipe("fast:cpu=amx,weights=fp32")) is None
    assert main(["list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    # the named fast-cpu was made for this machine's own CPU when the registry loaded: an AMX plan, or OpenVINO
    # computing in bf16 (emulated or f32 without native BF16), is slow on the AVX2 CPU
    here = get_recipe("fast-cpu")
    assert bool(rows["fast-cpu"]["slow_here"]) == (
        (here.library == "fast" and here.option("cpu") not in ("avx2", "portable"))
        or (here.library == "openvino" and here.option("precision") == "bf16")
    )
