"""The ONNX Runtime backend on the packaged tiny.en and real LibriSpeech utterances: the fp32 export transcribes
like transformers, each quantizer gives a working model, and an export reloads with onnxruntime alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_export import card_scripts, run_script  # tests/ is on sys.path (pytest's rootdir-less import mode)

from whisper_ptq.backends import get_recipe
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.errors import UserError
from whisper_ptq.evaluation import Quantized
from whisper_ptq.models.loading import load_model
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
    assert get_recipe("ort-int8").scheme == "dynamic" and get_recipe("ort-int8").granularity == "per-tensor"
    assert get_recipe("ort-int8-static").needs_calibration
    int4 = get_recipe("onnxruntime:mode=int4,block_size=64,symmetric=true")
    assert (int4.weights, int4.group_size, int4.symmetric) == ("int4", 64, True)
    with pytest.raises(UserError, match="block_size must be a power of two"):
        get_recipe("onnxruntime:mode=int4,block_size=48")
    with pytest.raises(UserError, match="per_channel does not apply to mode=int4"):
        get_recipe("onnxruntime:mode=int4,per_channel=true")
    with pytest.raises(UserError, match="block_size does not apply to mode=dynamic"):
        get_recipe("onnxruntime:block_size=64")


def test_fp32_export_transcribes_like_transformers(model_cache: Path, shared_data: Path, audios) -> None:
    bundle = load_model("tiny.en", model_cache)
    expected = [HFTranscriber(bundle.model, bundle.processor).transcribe([a])[0] for a in audios]
    session = build("ort-fp32", model_cache, shared_data, batch_size=2)  # one batch: the shorter row leaves first
    assert session.transcribe(audios) == expected
    assert session.info["linear_bits_per_weight"] == 32.0
    # the tied head reads the embedding: the ONNX folder is as large as transformers' fp32 state dict
    assert abs(session.size_bytes / session.info["fp32_size_bytes"] - 1) < 0.01


@pytest.mark.parametrize("recipe", ["ort-int8", "ort-int4"])
def test_quantize_transcribe_export_reload(
    recipe: str, model_cache: Path, shared_data: Path, audios, clips, tmp_path
) -> None:
    session = build(recipe, model_cache, shared_data)
    texts = session.transcribe(audios)
    assert all(len(t.split()) >= 3 for t in texts)
    assert session.transcribe(audios[:1]) == texts[:1] and session.size_bytes < session.info["fp32_size_bytes"]
    ops = session.info["onnx_ops"]
    assert ops.get("MatMulInteger" if recipe == "ort-int8" else "MatMulNBits", 0) > 0
    expected_bits = 8.0 if recipe == "ort-int8" else 4 + 32 / 32 + 4 / 32  # fp32 scale and 4-bit zero point per 32
    assert session.info["linear_bits_per_weight"] == pytest.approx(expected_bits, abs=0.01)
    export = session.save(tmp_path / "export")
    [(exact, script)] = card_scripts(export).values()  # the onnxruntime script of the model card
    reloaded, imported = run_script(script, export, clips, tmp_path)
    assert exact and not imported and reloaded == texts


def test_static_qdq_calibrates_on_the_calibration_split(model_cache: Path, shared_data: Path, audios) -> None:
    session = build("ort-int8-static", model_cache, shared_data, calibration_limit=2)
    assert session.info["calibration_utterances"] == 2 and session.info["onnx_ops"]["QuantizeLinear"] > 0
    assert all(len(t.split()) >= 3 for t in session.transcribe(audios))


def test_importing_the_quantizers_leaves_the_root_logger_alone() -> None:
    """onnxruntime.quantization configures the root logger at INFO when imported (hundreds of lines an open);
    the backend imports it without that. When ORT stops doing it, the workaround goes."""
    import subprocess
    import sys

    report = "import logging; r = logging.getLogger(); print(len(r.handlers), logging.getLevelName(r.level))"
    plain = "import onnxruntime.quantization.matmul_nbits_quantizer; " + report
    ours = "from whisper_ptq.backends.onnxruntime import import_ort_quantization; import_ort_quantization(); "
    outputs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        for code in (plain, ours + report)
    ]
    assert outputs == [["1", "INFO"], ["0", "WARNING"]]
