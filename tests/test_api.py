"""The public Python API (`whisper_ptq.quantize / evaluate / load / bench`), the README's example run as written,
and the light imports that keep the command line fast."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import whisper_ptq
from whisper_ptq.cli import error_message
from whisper_ptq.models.loading import load_model

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first Python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_example_runs_as_written(shared_data, model_cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WHISPER_PTQ_DATA", str(shared_data))
    monkeypatch.setenv("WHISPER_PTQ_CACHE", str(model_cache))
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), str(README), "exec"), {})  # noqa: S102 - the documented example itself
    assert (tmp_path / "tiny-ct2" / "whisper_ptq_export.json").is_file()


def test_evaluate_from_a_spec_equals_evaluate_of_a_quantized_model(shared_data, model_cache) -> None:
    clean = whisper_ptq.open_dataset("librispeech:test-clean", shared_data)
    by_spec = whisper_ptq.evaluate("tiny.en", clean, limit=2, cache_dir=model_cache, progress=False)
    quantized = whisper_ptq.quantize("tiny.en", "fp32", cache_dir=model_cache, batch_size=2)
    by_object = whisper_ptq.evaluate(quantized, clean, limit=2, progress=False)
    assert [r.hypothesis for r in by_spec.rows] == [r.hypothesis for r in by_object.rows]
    assert by_spec.wer == by_object.wer and by_spec.cer == by_object.cer
    assert by_spec.size_bytes == quantized.size_bytes > 100e6  # fp32 tiny.en
    assert by_spec.rtf > 0 and len(by_spec.rows) == 2
    assert by_spec.info["batch_size"] == 1 and by_object.info["batch_size"] == 2  # batched text == batch-1 text
    assert by_spec.summary()["wer"] == by_spec.wer


def test_a_users_transformers_model_is_quantized_as_a_copy(shared_data, model_cache) -> None:
    bundle = load_model("tiny.en", model_cache)
    model, processor = bundle.model, bundle.processor
    before = model.model.encoder.layers[0].fc1.weight.detach().clone()
    quantized = whisper_ptq.quantize(model, "torch-int8-dynamic", processor=processor)
    clip = whisper_ptq.open_dataset("librispeech:test-clean", shared_data).utterances[0].audio_path
    text = quantized.transcribe(clip)
    assert isinstance(text, str) and len(text.split()) > 3
    # The user's model is untouched: still an fp32 nn.Linear with the same weights.
    assert type(model.model.encoder.layers[0].fc1) is torch.nn.Linear
    assert torch.equal(model.model.encoder.layers[0].fc1.weight, before)
    assert quantized.model is not model and quantized.info["model_kind"] == "object"
    # Loaded from a folder that holds its processor: no processor argument needed.
    from transformers import WhisperForConditionalGeneration

    reloaded = WhisperForConditionalGeneration.from_pretrained(bundle.hf_dir)
    assert whisper_ptq.quantize(reloaded, "fp32").transcribe([clip]) == [whisper_ptq.quantize(model).transcribe(clip)]


def test_library_errors_name_the_argument_and_the_cli_maps_them_to_flags(model_cache) -> None:
    with pytest.raises(whisper_ptq.UserError) as caught:
        whisper_ptq.quantize("tiny.en", "fp32", batch_size=0)
    assert caught.value.param == "batch_size" and str(caught.value).startswith("batch_size must be")
    assert error_message(caught.value).startswith("--batch-size must be")
    with pytest.raises(whisper_ptq.UserError, match="recipe: expected a recipe name"):
        whisper_ptq.quantize("tiny.en", 42)
    with pytest.raises(whisper_ptq.UserError, match="unknown parameter 'nbit' for hqq"):
        whisper_ptq.quantize("tiny.en", "hqq:nbit=4")
    quantized = whisper_ptq.quantize("tiny.en", "fp32", cache_dir=model_cache)
    with pytest.raises(whisper_ptq.UserError, match="already quantized this model"):
        whisper_ptq.evaluate(quantized, "librispeech:test-clean", recipe="hqq-int4")
    with pytest.raises(whisper_ptq.UserError, match="model: expected a model spec"):
        whisper_ptq.quantize(object())


def test_transcribe_options_of_one_call_are_checked_as_a_run_checks_them(shared_data, model_cache) -> None:
    quantized = whisper_ptq.quantize("tiny.en", "fast-cpu-fp32", cache_dir=model_cache)
    clip = whisper_ptq.open_dataset("librispeech:test-clean", shared_data).utterances[0].audio_path
    assert quantized.transcribe(clip, language="en") == quantized.transcribe(clip)
    with pytest.raises(whisper_ptq.UserError, match="English-only"):
        quantized.transcribe(clip, language="de")
    with pytest.raises(whisper_ptq.UserError, match="decodes greedily only"):
        quantized.transcribe(clip, beam_size=5)
    with pytest.raises(whisper_ptq.UserError, match="language must be a Whisper language code"):
        quantized.transcribe(clip, language="xx")


@pytest.mark.parametrize(
    "module",
    ["whisper_ptq", "whisper_ptq.cli", "whisper_ptq.report", "whisper_ptq.backends", "whisper_ptq.report.compare"],
)
def test_light_modules_import_no_model_library(module: str) -> None:
    code = f"import sys, {module}; heavy = {{'torch', 'transformers', 'matplotlib'}} & set(sys.modules); print(heavy)"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    expected = {"whisper_ptq.report": "{'matplotlib'}"}.get(module, "set()")
    assert printed.strip() in (expected, "set()"), printed
