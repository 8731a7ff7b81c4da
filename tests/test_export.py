"""Exports load in their own ecosystem: per backend, tiny.en is quantized and exported, then every load script
of the export's model card (README.md) runs in a fresh Python process, as a user would run it, on two
utterances. A script that uses its library's own loader must not import whisper_ptq, and a script the card
says reproduces the measurement must print exactly the transcripts whisper-ptq gives in this process."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import whisper_ptq
from whisper_ptq.backends import backend_for, get_recipe
from whisper_ptq.backends.mixed import PlanEntry, mixed_recipe
from whisper_ptq.cli import main
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.export import CARD, MARKER, check_export_target
from whisper_ptq.recipes import Recipe

# Runs a card's script as `python transcribe.py EXPORT_DIR CLIP...`, then says whether it imported whisper_ptq.
RUNNER = """\
import runpy, sys
script, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
print("IMPORTED_WHISPER_PTQ" if any(m.split(".")[0] == "whisper_ptq" for m in sys.modules) else "NO_WHISPER_PTQ")
"""
# recipe -> the card's scripts, by title: whether each is the library's own loader (no whisper_ptq allowed)
CASES = {
    "fp32": {"transformers": True},
    "bnb-nf4": {"transformers": True},
    "bnb-int8": {"transformers": True},
    "torchao-int8-dynamic": {"transformers": True},
    "torchao-int4-weight-only": {"whisper-ptq": False},
    "hqq-int4": {"hqq": True},
    "quanto-int8": {"optimum-quanto": True},
    "quanto-int8-fp8-static": {"optimum-quanto": True},
    "ct2-int8": {"faster-whisper": True, "ctranslate2": True},
    "faster-whisper-int8": {"faster-whisper": True, "ctranslate2": True},
    "ort-int8": {"onnxruntime": True},
    "ov-int4": {"openvino": True},
    "torch-int8-dynamic": {"whisper-ptq": False},
    "torch-int8-static": {"whisper-ptq": False},
    "fast:cpu=auto": {"whisper-ptq": False},  # the fast engine with this CPU's plan
    "mixed": {"whisper-ptq": False},
}
# Run by the default suite (one per kind of loader: transformers, a library's own, a runtime's, whisper-ptq's); the
# rest are `heavy` (pytest -m heavy).
DEFAULT_CASES = ("bnb-int8", "quanto-int8", "ct2-int8", "torch-int8-dynamic")
# A plan as `whisper-ptq search` writes them: one library, some groups of layers
MIXED = mixed_recipe("mixed", [PlanEntry("encoder MLP", (r"encoder\.layers\.\d+\.fc",), get_recipe("hqq-int4"))])


def recipe_for(name: str) -> Recipe:
    return MIXED if name == "mixed" else get_recipe(name)


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> list[str]:
    return [str(u.audio_path) for u in open_dataset("librispeech:test-clean", shared_data).utterances[:2]]


def card_scripts(export: Path) -> dict[str, tuple[bool, str]]:
    """Title -> (whether the card says it prints the measured transcripts, the script) of each load script."""
    card = (export / CARD).read_text()
    scripts = {}
    for match in re.finditer(r"^### (.+?)\n(.*?)```python\n(.*?)```", card, re.S | re.M):
        heading, script = match.group(1), match.group(3)
        exact = "(prints the transcripts whisper-ptq measured)" in heading
        scripts[heading.split(" (")[0]] = (exact, script)
    return scripts


def run_script(script: str, export: Path, clips: list[str], tmp_path: Path) -> tuple[list[str], bool]:
    """The script's printed transcripts, and whether it imported whisper_ptq, from a fresh interpreter."""
    path = tmp_path / "transcribe.py"
    path.write_text(script)
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path), str(export), *clips],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *texts, imported = done.stdout.splitlines()
    return texts, imported == "IMPORTED_WHISPER_PTQ"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [name if name in DEFAULT_CASES else pytest.param(name, marks=pytest.mark.heavy) for name in CASES]
)
def test_every_load_script_of_the_card_transcribes(name, clips, model_cache, shared_data, tmp_path) -> None:
    q = whisper_ptq.quantize(
        "tiny.en", recipe_for(name), cache_dir=model_cache, data_root=shared_data, calibration_limit=8, threads=2
    )
    export = q.save(tmp_path / "export")
    expected = q.transcribe(clips)
    scripts = card_scripts(export)
    assert set(scripts) == set(CASES[name])
    for title, (exact, script) in scripts.items():
        texts, imported = run_script(script, export, clips, tmp_path)
        assert len(texts) == len(clips) and all(t.strip() for t in texts), (title, texts)
        if CASES[name][title]:
            assert "whisper_ptq" not in script and not imported, title
        if exact:
            assert texts == expected, (title, texts, expected)
    assert whisper_ptq.load(export, threads=2).transcribe(clips) == expected


@pytest.mark.slow
def test_a_load_script_reads_any_clip_as_whisper_ptq_does_and_refuses_what_it_would_cut(
    model_cache, shared_data, tmp_path
) -> None:
    """The scripts that compute their own features read a clip as whisper-ptq does (an LJ Speech clip, 22.05 kHz,
    as stereo: whisper-ptq's own transcript), and refuse a clip over the 30 s window instead of transcribing its
    first 30 s."""
    import soundfile

    audio, rate = soundfile.read(open_dataset("ljspeech", shared_data).utterances[0].audio_path, dtype="float32")
    stereo, long = tmp_path / "stereo.wav", tmp_path / "long.wav"
    soundfile.write(stereo, np.stack([audio, audio], axis=1), rate)
    soundfile.write(long, np.tile(audio, int(31 * rate / len(audio)) + 1), rate)
    q = whisper_ptq.quantize("tiny.en", "ct2-int8", cache_dir=model_cache, threads=2)
    export = q.save(tmp_path / "export")
    exact, script = card_scripts(export)["ctranslate2"]
    texts, _ = run_script(script, export, [str(stereo)], tmp_path)
    assert exact and texts == q.transcribe([str(stereo)])
    done = subprocess.run(
        [sys.executable, str(tmp_path / "transcribe.py"), str(export), str(long)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0 and f"{long}: " in done.stderr and "clips of 30 s or less" in done.stderr


@pytest.mark.slow
def test_faster_whisper_opens_the_ct2_export_as_it_is(clips, model_cache, tmp_path) -> None:
    """The issue's acceptance check, in faster-whisper's own words: WhisperModel(export_dir, ...)."""
    from faster_whisper import WhisperModel

    export = whisper_ptq.quantize("tiny.en", "ct2-int8", cache_dir=model_cache).save(tmp_path / "ct2")
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in export.iterdir()
    }
    model = WhisperModel(str(export), device="cpu", compute_type="int8", cpu_threads=2)
    segments, info = model.transcribe(clips[0], beam_size=1, language="en")
    text = "".join(s.text for s in segments)
    assert "stew for dinner" in text and info.duration > 1


@pytest.mark.slow
def test_cli_export_card_permissions_and_force(shared_data, model_cache, tmp_path, capsys) -> None:
    out = tmp_path / "exp"
    args = ["export", "--model", "tiny.en", "--recipe", "fp32", "--out", str(out), "--cache-dir", str(model_cache)]
    args += ["--data-root", str(shared_data), "--threads", "2", "--no-progress"]
    umask = os.umask(0o022)
    try:
        assert main([*args, "--evaluate", "librispeech:test-clean", "--limit", "2"]) == 0
    finally:
        os.umask(umask)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"exported tiny.en with fp32 to .*: 151\.\d MB \(fp16 75\.\d MB, fp32 151\.\d MB\); .*", line)
    for path in [out, *out.rglob("*")]:  # safetensors writes its files 0600; a service user must read them
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    marker = json.loads((out / MARKER).read_text())
    assert marker["evaluation"]["n_utterances"] == 2 and marker["evaluation"]["dataset"] == "librispeech:test-clean"
    assert marker["size"]["size_bytes"] == marker["size"]["fp32_size_bytes"]
    assert abs(marker["size"]["fp16_size_bytes"] / marker["size"]["fp32_size_bytes"] - 0.5) < 0.001
    assert len(marker["source"]["sha256"]) == 64
    card = (out / CARD).read_text()
    for fact in (marker["source"]["sha256"], f"{marker['evaluation']['wer']:.2f}", "| weights | fp32 |"):
        assert fact in card
    assert f"| transformers | {marker['versions']['transformers']} |" in card

    assert main(args) == 2  # an earlier export is replaced only when asked
    assert "holds an earlier export; set --force to replace it" in capsys.readouterr().err
    (out / "stale.txt").write_text("from the earlier export")
    assert main([*args, "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_an_export_never_replaces_what_is_not_an_export(tmp_path, capsys) -> None:
    """Refused before any model loads, even with --force."""
    (tmp_path / "notes.txt").write_text("mine")
    args = ["export", "--model", "tiny.en", "--recipe", "ct2-int8", "--out", str(tmp_path), "--force"]
    assert main(args) == 2
    assert "holds files that are not a whisper-ptq export: not replacing them" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "notes.txt").unlink()
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_export_target(target, force=True)


def test_every_named_recipe_has_a_load_script() -> None:
    """Each backend says how its exports load; those with their own library's loader never need whisper_ptq."""
    for name in CASES:
        recipe = recipe_for(name)
        loaders = backend_for(recipe).loaders(recipe, english_only=True)
        assert [loader.title for loader in loaders] == list(CASES[name])
        for loader in loaders:
            compile(loader.script, loader.title, "exec")
            assert ("import whisper_ptq" in loader.script) == (loader.title == "whisper-ptq")
