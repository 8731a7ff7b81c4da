"""The GPU half: CUDA-only recipes refused on CPU, CUDA timing, and every `paper-gpu` recipe on a real GPU.

The tests marked `gpu` skip, saying why, where `torch.cuda.is_available()` is false. They run on tiny.en over
two shared utterances; WHISPER_PTQ_TEST_MODEL names another model (a packaged name or a local CTranslate2 /
transformers directory) and WHISPER_PTQ_DATA another data root, for a GPU machine without the packaged
tiny.en or the shared folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from whisper_ptq import evaluation
from whisper_ptq.backends import get_recipe
from whisper_ptq.cli import main
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.decoding import Transcript
from whisper_ptq.errors import UserError
from whisper_ptq.evaluation import Quantized
from whisper_ptq.preflight import check_runnable
from whisper_ptq.results.rows import summarize
from whisper_ptq.settings import Settings
from whisper_ptq.studies.experiment import load_experiment

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU here (torch.cuda.is_available() is false)")
MODEL = os.environ.get("WHISPER_PTQ_TEST_MODEL", "tiny.en")
UTTERANCES = 2
# Every recipe of the GPU preset except fp32, which test_fp32_on_cuda_agrees_with_cpu covers.
GPU_RECIPES = [r for r in load_experiment("paper-gpu").recipes if r != "fp32"]


@pytest.fixture(scope="module")
def data_root(request: pytest.FixtureRequest) -> Path:
    if env := os.environ.get("WHISPER_PTQ_DATA"):
        return Path(env)
    return request.getfixturevalue("shared_data")


@pytest.fixture(scope="module")
def clean(data_root: Path):
    return open_dataset("librispeech:test-clean", data_root).limit(UTTERANCES)


# ---------------------------------------------------------------------------------------------- any machine


@pytest.mark.parametrize("name", ["fp16", "reference:dtype=fp16"])
def test_cuda_only_recipe_is_refused_on_cpu(name):
    with pytest.raises(UserError, match=r"cannot run here: .* runs on cuda, not cpu"):
        check_runnable(get_recipe(name), "cpu")


def test_eval_of_cuda_only_recipe_on_cpu_fails_before_loading_anything(data_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["eval", "--recipe", "fp16", "--device", "cpu", "--data-root", str(data_root), "--out", str(out)]
        + ["--model", str(tmp_path / "no-such-model"), "--no-progress"]
    )
    # The recipe is refused first: the missing model directory is never reached, and nothing is written.
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: recipe 'fp16' cannot run here: fp16 runs on cuda, not cpu"
    assert not out.exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks what a machine without a GPU says")
def test_list_on_a_machine_without_gpu_says_why_nothing_runs_on_cuda(capsys):
    assert main(["list", "--json", "--device", "cuda"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert not any(row["runnable"] for row in rows.values())
    for name in load_experiment("paper-gpu").recipes:
        reason = rows[name]["reason"]
        assert reason == "no CUDA device present" or reason.startswith("library not installed"), (name, reason)
    assert rows["fast-cpu-fp32"]["reason"] == "fast-cpu-fp32 runs on cpu, not cuda"


def test_cuda_timing_waits_for_the_gpu(monkeypatch):
    """The timed region ends with torch.cuda.synchronize() on cuda (kernels run asynchronously), and only there."""
    calls = []

    def synchronize():
        time.sleep(0.05)  # a GPU still busy when the host returns
        calls.append(time.perf_counter())

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    text = Transcript("text", "en", False, 1.0, 1)
    monkeypatch.setattr(evaluation, "transcribe", lambda engine, audios, options: [text] * len(audios))
    for device, expected_calls in (("cuda", 1), ("cuda:0", 2), ("cpu", 2)):
        session = Quantized(None, None, SimpleNamespace(transcriber=None), Settings(), {"device": device})
        texts, seconds = session.transcribe_timed([None, None])
        assert texts == [text, text] and len(calls) == expected_calls
        if device.startswith("cuda"):
            assert seconds >= 0.05, "the wait for the GPU is inside the timed region"


# ---------------------------------------------------------------------------------------------- on a GPU


def run(recipe: str, device: str, dataset, cache: Path):
    settings = Settings(device=device, batch_size=UTTERANCES, cache_dir=cache)
    session = Quantized.build(MODEL, get_recipe(recipe), settings, [dataset])
    result = session.evaluate(dataset, progress=False)
    return session, result


@gpu
def test_fp32_on_cuda_agrees_with_cpu(clean, model_cache):
    _, cpu = run("fp32", "cpu", clean, model_cache)
    session, cuda = run("fp32", "cuda", clean, model_cache)
    assert session.info["device"] == "cuda" and session.info["batch_size"] == UTTERANCES
    assert next(session.built.model.parameters()).device.type == "cuda"
    # cuDNN may run the encoder's convolutions in TF32, so allow one word of difference, no more.
    cpu_errors = sum(r.word_errors for r in cpu.rows)
    assert abs(sum(r.word_errors for r in cuda.rows) - cpu_errors) <= 1, [r.hypothesis for r in cuda.rows]
    assert summarize(cuda.rows)["rtf"] > 0


@gpu
@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipe_runs_on_cuda(recipe, clean, model_cache):
    session, result = run(recipe, "cuda", clean, model_cache)
    model = session.built.model
    on_cpu = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cuda"]
    assert not on_cpu, f"{recipe}: left on the CPU: {on_cpu[:5]}"
    summary = summarize(result.rows)
    assert summary["n_utterances"] == UTTERANCES and summary["rtf"] > 0
    assert summary["wer"] < 40, [r.hypothesis for r in result.rows]
    if recipe not in ("fp16", "bf16"):
        assert session.info["size_reduction"] > 0.2, session.info["size_reduction"]
