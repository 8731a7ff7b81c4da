"""The OpenVINO backend on the packaged tiny.en and real LibriSpeech utterances: the fp32 IR transcribes like
transformers, NNCF's weight compression and PTQ give working models, and an export reloads with openvino alone."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_export import card_scripts, run_script  # tests/ is on sys.path (pytest's rootdir-less import mode)

from whisper_ptq import preflight
from whisper_ptq.backends import backend_for, get_recipe
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.errors import UserError
from whisper_ptq.evaluation import Quantized
from whisper_ptq.models.loading import load_model
from whisper_ptq.results import environment
from whisper_ptq.settings import Settings

UTTERANCES = (4, 1)  # test-clean sample: 2.1 s and 3.3 s


@pytest.fixture(scope="module")
def audios(shared_data: Path) -> list[np.ndarray]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    return [dataset.load_audio(dataset.utterances[i]) for i in UTTERANCES]


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> list[str]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    return [str(dataset.utterances[i].audio_path) for i in UTTERANCES]


def build(recipe: str, cache: Path, data: Path, **settings) -> Quantized:
    settings = Settings(cache_dir=cache, data_root=data, threads=2, **settings)
    return Quantized.build("tiny.en", get_recipe(recipe), settings)


def test_named_recipes_and_refusals() -> None:
    assert get_recipe("ov-int8").weights == "int8" and not get_recipe("ov-int8").needs_calibration
    assert get_recipe("ov-int4").group_size == 128 and not get_recipe("ov-int4").needs_calibration
    assert get_recipe("ov-int4-awq").needs_calibration and get_recipe("ov-int8-ptq").activations == "int8"
    with pytest.raises(UserError, match="group_size does not apply to mode=int8"):
        get_recipe("openvino:group_size=64")
    with pytest.raises(UserError, match="ratio must be in"):
        get_recipe("openvino:mode=int4,ratio=0")
    with pytest.raises(UserError, match="smooth_quant_encoder does not apply to mode=int4"):
        get_recipe("openvino:mode=int4,smooth_quant_encoder=0.5")
    with pytest.raises(UserError, match="dynamic_quant_encoder does not apply to mode=none"):
        get_recipe("openvino:mode=none,dynamic_quant_encoder=0")
    with pytest.raises(UserError, match="dynamic_quant_decoder must be 0 .off. or a group size, got -32"):
        get_recipe("openvino:dynamic_quant_decoder=-32")
    dq = dict(get_recipe("ov-int8-bf16-dq128").options)
    assert (dq["precision"], dq["dynamic_quant_encoder"], dq["dynamic_quant_decoder"]) == ("bf16", 128, 0)


@pytest.mark.parametrize(
    "flags, slow",
    [
        (["avx2", "fma"], True),
        (["avx2", "fma", "avx512f", "avx512_vnni"], True),  # Cascade Lake: bf16 emulated
        (["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"], False),
        (["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"], False),
    ],
)
def test_a_bf16_recipe_says_so_on_a_cpu_without_native_bf16(flags, slow, monkeypatch, capsys, no_isa_caps) -> None:
    monkeypatch.setattr(environment, "cpu_flags", lambda: flags)
    backend = backend_for(get_recipe("ov-int8-bf16-dq128"))
    reason = backend.slow_here(get_recipe("ov-int8-bf16-dq128"), "cpu")
    assert (reason is not None) == slow
    assert reason is None or "precision=f32" in reason
    assert backend.slow_here(get_recipe("ov-int8-dq128"), "cpu") is None
    # warned once a process, though the CLI checks before loading the model and Quantized.build again
    monkeypatch.setattr(preflight, "WARNED", set())
    for _ in range(2):
        preflight.check_runnable(get_recipe("ov-int8-bf16-dq128"), "cpu")
    assert capsys.readouterr().err.count("is slow on this CPU") == (1 if slow else 0)


@pytest.mark.parametrize(
    "flags, cap, recipe, expected",
    [
        (["avx2", "fma"], None, "ov-int8", {"encoder": 0, "decoder": 0}),  # no VNNI: float inputs
        (["avx2", "fma", "avx_vnni"], None, "ov-int8", {"encoder": 32, "decoder": 32}),  # Alder Lake
        (["avx2", "fma", "avx_vnni"], "AVX2", "ov-int8", {"encoder": 0, "decoder": 0}),
        (["avx2", "fma", "avx512f", "avx512_vnni"], None, "ov-int8-dq128", {"encoder": 128, "decoder": 0}),
        (["avx2", "fma", "avx512f", "avx512_vnni"], "AVX512_CORE", "ov-int8", {"encoder": 0, "decoder": 0}),
        (["avx2", "fma", "avx512f", "avx512_vnni"], None, "ov-int8-ptq-encoder-bf16", {"encoder": 0, "decoder": 32}),
        (["avx2", "fma", "avx512f", "avx512_vnni"], None, "ov-fp32", {"encoder": 0, "decoder": 0}),
    ],
)
def test_where_the_plugin_quantizes_activations_at_run_time(
    flags, cap, recipe, expected, monkeypatch, no_isa_caps
) -> None:
    """ "Weight-only" ov-int8 multiplies int8 activations where the CPU has VNNI: the record says so per graph, and
    the recipe's description says it may."""
    from whisper_ptq.backends.openvino import dynamic_quantization_here

    monkeypatch.setattr(environment, "cpu_flags", lambda: flags)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    quantized = get_recipe(recipe)
    assert dynamic_quantization_here(quantized) == expected
    assert ("quantizes the inputs of its int8/int4 linears at run time" in quantized.description) == (
        recipe != "ov-fp32"
    )


def test_the_run_time_quantization_record_matches_the_plugins_outputs(model_cache: Path, shared_data: Path) -> None:
    """The encoder of ov-int8 (groups of 32) gives other outputs than the same IR with the plugin's dynamic
    quantization off exactly where `dynamic_quantization` records it as on, here: on a CPU without VNNI they are
    the same to the bit."""
    on, off = (
        build("ov-int8", model_cache, shared_data),
        build("openvino:dynamic_quant_encoder=0", model_cache, shared_data),
    )
    assert off.info["dynamic_quantization"]["encoder"] == 0
    features = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
    outputs = [q.built.transcriber.run_encoder(features)[0] for q in (on, off)]
    quantized = on.info["dynamic_quantization"]["encoder"] == 32
    assert quantized == environment.has_vnni()
    assert np.array_equal(*outputs) != quantized


def test_an_isa_cap_the_plugin_cannot_compile_under_is_one_clear_error(model_cache, shared_data, tmp_path) -> None:
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU left ov-int8's first encoder call without a kernel: a traceback.
    Where the cap lowers nothing (an AVX2 CPU), the run succeeds; either way no traceback, no half-written --out."""
    out = tmp_path / "run"
    command = [sys.executable, "-P", "-m", "whisper_ptq.cli", "eval", "--model", "tiny.en", "--recipe", "ov-int8"]
    command += ["--dataset", "librispeech:test-clean", "--limit", "1", "--no-progress", "--out", str(out)]
    command += ["--cache-dir", str(model_cache), "--data-root", str(shared_data)]
    done = subprocess.run(command, env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if done.returncode:
        assert done.returncode == 2 and not out.exists()
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: OpenVINO cannot ") and "under ONEDNN_MAX_CPU_ISA=AVX2" in last, last
    else:
        assert (out / "summary.json").is_file()


def test_fp32_ir_transcribes_like_transformers(model_cache: Path, shared_data: Path, audios) -> None:
    bundle = load_model("tiny.en", model_cache)
    expected = [HFTranscriber(bundle.model, bundle.processor).transcribe([a])[0] for a in audios]
    session = build("ov-fp32", model_cache, shared_data, batch_size=2)  # one batch: the shorter row leaves first
    assert session.transcribe(audios) == expected
    assert session.info["linear_bits_per_weight"] == 32.0
    assert session.info["plugin_properties"]["encoder"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert "f32" in session.info["ir_constant_types"] and "u8" not in session.info["ir_constant_types"]
    assert abs(session.size_bytes / session.info["fp32_size_bytes"] - 1) < 0.01


@pytest.mark.parametrize("recipe", ["ov-int8", "ov-int8-bf16", "ov-int4"])  # bf16: bf16 ports where native
def test_compress_transcribe_export_reload(
    recipe: str, model_cache: Path, shared_data: Path, audios, clips, tmp_path
) -> None:
    session = build(recipe, model_cache, shared_data)
    texts = session.transcribe(audios)
    assert all(len(t.split()) >= 3 for t in texts)
    assert session.transcribe(audios[:1]) == texts[:1] and session.size_bytes < session.info["fp32_size_bytes"]
    int8 = recipe.startswith("ov-int8")
    assert ("u8" if int8 else "u4") in session.info["ir_constant_types"]  # asymmetric: unsigned
    low, high = (8, 8.5) if int8 else (4, 5)
    assert low <= session.info["linear_bits_per_weight"] <= high
    export = session.save(tmp_path / "export")
    [(exact, script)] = card_scripts(export).values()  # the openvino script of the model card
    reloaded, imported = run_script(script, export, clips, tmp_path)
    assert exact and not imported and reloaded == texts


def test_ptq_calibrates_on_the_calibration_split(model_cache: Path, shared_data: Path, audios) -> None:
    """A calibrated build is kept under its calibration audio's key: the same clips reopen it, other clips
    (here one more) make another build."""
    session = build("ov-int8-ptq", model_cache, shared_data, calibration_limit=2)
    assert session.info["calibration_utterances"] == 2
    texts = session.transcribe(audios)
    assert all(len(t.split()) >= 3 for t in texts)
    again = build("ov-int8-ptq", model_cache, shared_data, calibration_limit=2)
    assert again.info["reused_build"] and again.info["kept_build"] == session.info["kept_build"]
    assert again.transcribe(audios) == texts
    other = build("ov-int8-ptq", model_cache, shared_data, calibration_limit=3)
    assert not other.info["reused_build"] and other.info["kept_build"] != session.info["kept_build"]


def test_ptq_encoder_quantizes_the_encoder_only(model_cache: Path, shared_data: Path, audios) -> None:
    """`mode=ptq-encoder`: FakeQuantize nodes (int8 activations) in the encoder graph only, the decoder's
    weights compressed to int8, calibrated on the clips' features without decoding them."""
    recipe = get_recipe("ov-int8-ptq-encoder-bf16")
    assert recipe.needs_calibration and recipe.activations == "int8"
    session = build(recipe.name, model_cache, shared_data, calibration_limit=2)
    assert all(len(t.split()) >= 3 for t in session.transcribe(audios))
    assert session.info["plugin_properties"]["decoder"]["INFERENCE_PRECISION_HINT"] == "bf16"
    import openvino as ov

    core = ov.Core()
    fake = {
        part: sum(
            op.get_type_name() == "FakeQuantize"
            for op in core.read_model(session.built.model / f"{part}.xml").get_ops()
        )
        for part in ("encoder", "decoder")
    }
    assert fake["encoder"] > 0 and fake["decoder"] == 0
    assert "u8" in session.info["ir_constant_types"] and session.size_bytes < session.info["fp32_size_bytes"]
    with pytest.raises(UserError, match="smooth_quant_decoder does not apply to mode=ptq-encoder"):
        get_recipe("openvino:mode=ptq-encoder,smooth_quant_decoder=0.5")


def test_a_second_open_reuses_the_kept_build(model_cache: Path, shared_data: Path, audios) -> None:
    """The converted, compressed IR is kept under the cache (backends/reuse.py): opening the same recipe again
    restores it and transcribes as the build did; another recipe is another entry, but not one that differs in
    the compile precision only (the same IR); a damaged entry is rebuilt."""
    first = build("openvino:symmetric=true", model_cache, shared_data)
    again = build("openvino:symmetric=true", model_cache, shared_data)
    assert again.info["reused_build"] and again.info["kept_build"] == first.info["kept_build"]
    assert again.transcribe(audios) == first.transcribe(audios)
    assert again.info["linear_bits_per_weight"] == first.info["linear_bits_per_weight"]
    int8 = build("ov-int8", model_cache, shared_data)
    assert int8.info["kept_build"] != first.info["kept_build"]
    bf16 = build("ov-int8-bf16", model_cache, shared_data)
    assert bf16.info["reused_build"] and bf16.info["kept_build"] == int8.info["kept_build"]
    precisions = [q.info["plugin_properties"]["decoder"]["INFERENCE_PRECISION_HINT"] for q in (bf16, int8)]
    assert precisions == ["bf16", "f32"]
    unquantized_decoder = build("openvino:dynamic_quant_decoder=0", model_cache, shared_data)
    assert unquantized_decoder.info["kept_build"] == int8.info["kept_build"]
    assert unquantized_decoder.info["plugin_properties"]["decoder"]["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0
    (Path(first.info["kept_build"]) / "model" / "decoder.xml").unlink()
    rebuilt = build("openvino:symmetric=true", model_cache, shared_data)
    assert not rebuilt.info["reused_build"] and rebuilt.transcribe(audios) == first.transcribe(audios)


def test_bf16_cross_attention_ports_change_no_result(model_cache: Path, shared_data: Path, audios) -> None:
    """Computing in bf16, the engine passes the cross-attention keys/values between the graphs in bf16
    (`compile_graphs`): it transcribes exactly as the plain f32 ports do, the logits of every step to the bit."""
    import openvino as ov

    from whisper_ptq.engines.graphs import GraphDecoding
    from whisper_ptq.engines.openvino import DECODER, ENCODER, compile_config, native_capabilities

    core = ov.Core()
    if "BF16" not in native_capabilities(core):
        pytest.skip("this CPU does not compute in bf16 natively: the engine keeps f32 ports")
    session = build("ov-int8-bf16", model_cache, shared_data)
    encoder, decoder = session.built.transcriber.run_encoder, session.built.transcriber.run_decoder
    assert encoder(np.zeros((1, 80, 3000), np.float32))[0].dtype == np.uint16  # bf16 bits
    properties, folder = session.info["plugin_properties"], Path(session.built.model)
    plain = {
        part: core.compile_model(str(folder / graph), "CPU", compile_config(2, properties[part])).create_infer_request()
        for graph, part in ((ENCODER, "encoder"), (DECODER, "decoder"))
    }
    logits: list[np.ndarray] = []
    reference = GraphDecoding(
        lambda features: list(plain["encoder"].infer({"input_features": features}).values()),
        lambda feeds: (out := list(plain["decoder"].infer(feeds).values()), logits.append(out[0]))[0],
        session.bundle.model,
        session.bundle.processor,
    )
    built = dataclasses.replace(session.built, transcriber=reference)
    expected = Quantized(session.bundle, session.recipe, built, session.settings, session.info).transcribe(audios)
    ported: list[np.ndarray] = []
    session.built.transcriber.run_decoder = lambda feeds: (out := decoder(feeds), ported.append(out[0]))[0]
    assert session.transcribe(audios) == expected
    assert len(ported) == len(logits) and all(np.array_equal(a, b) for a, b in zip(ported, logits, strict=True))


def test_numpy_weight_lowering_is_nncfs_own_result(model_cache: Path) -> None:
    """The int8 compression runs NNCF's numpy lowering (faster to open): it stores the very weights, scales and
    zero points of NNCF's default path, and leaves the environment as it found it."""
    import os

    import nncf

    from whisper_ptq.backends.openvino import NNCF_NUMPY_LOWERING, numpy_weight_lowering
    from whisper_ptq.engines.openvino import convert_openvino

    _, decoder = convert_openvino(load_model("tiny.en", model_cache).model)
    mode = nncf.CompressWeightsMode.INT8_ASYM
    default = nncf.compress_weights(decoder.clone(), mode=mode)
    with numpy_weight_lowering():
        lowered = nncf.compress_weights(decoder.clone(), mode=mode)
    assert NNCF_NUMPY_LOWERING not in os.environ

    def constants(model) -> list[np.ndarray]:
        return [op.get_data() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]

    stored, expected = constants(lowered), constants(default)
    assert sum(c.dtype == np.uint8 for c in stored) >= 4 * 4  # every decoder linear's weight and zero point
    assert len(stored) == len(expected) and all(np.array_equal(a, b) for a, b in zip(stored, expected, strict=True))
