"""Non-English speech on the multilingual packaged `base`: the language token, its detection, the basic
normalizer, translation into English.

No real non-English recording is available offline, so the speech is made with espeak-ng (Debian's
`espeak-ng`) from known German sentences: synthetic, robotic speech, hence loose bounds. Skipped without
espeak-ng."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from whisper_ptq.backends import get_recipe
from whisper_ptq.data import open_dataset
from whisper_ptq.errors import UserError
from whisper_ptq.evaluation import Quantized
from whisper_ptq.settings import DecodingOptions, Settings

GERMAN = [
    (
        "Heute scheint die Sonne und die Kinder spielen im Garten.",
        "Today the sun is shining and the children are playing in the garden.",
    ),
    (
        "Ich möchte eine Tasse Kaffee und ein Stück Kuchen bestellen.",
        "I would like to order a cup of coffee and a piece of cake.",
    ),
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)"
    ),
]


@pytest.fixture(scope="module")
def german(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("german")
    with open(folder / "de.jsonl", "w") as manifest, open(folder / "en.jsonl", "w") as english:
        for i, (text, translation) in enumerate(GERMAN):
            subprocess.run(["espeak-ng", "-v", "de", "-s", "140", "-w", str(folder / f"{i}.wav"), text], check=True)
            manifest.write(json.dumps({"audio": f"{i}.wav", "text": text}) + "\n")
            english.write(json.dumps({"audio": f"{i}.wav", "text": translation}) + "\n")
    return folder


def evaluate(folder: Path, manifest: str, cache: Path, **decoding):
    settings = Settings(cache_dir=cache, threads=2, decoding=DecodingOptions(**decoding))
    quantized = Quantized.build("base", get_recipe("ct2-int8"), settings)
    return quantized.evaluate(open_dataset(f"manifest:{folder / manifest}"), progress=False)


def test_german_with_the_basic_normalizer(german: Path, model_cache: Path) -> None:
    result = evaluate(german, "de.jsonl", model_cache, language="de")
    assert all(r.language == "de" for r in result.rows)
    assert result.wer < 30, [r.hypothesis for r in result.rows]
    assert result.info["decoding"]["language"] == "de"


def test_language_is_detected(german: Path, model_cache: Path) -> None:
    result = evaluate(german, "de.jsonl", model_cache, language="auto")
    assert [r.language for r in result.rows] == ["de", "de"]


def test_translation_is_english(german: Path, model_cache: Path) -> None:
    result = evaluate(german, "en.jsonl", model_cache, language="de", task="translate")
    assert result.wer < 80 and all(r.language == "en" for r in result.rows)  # scored as English text
    assert any(word in result.rows[0].hypothesis.lower() for word in ("sun", "children", "garden"))


def test_a_language_the_model_lacks_is_refused(model_cache: Path) -> None:
    with pytest.raises(UserError, match="no language 'yue'"):
        Quantized.build(
            "base", get_recipe("ct2-int8"), Settings(cache_dir=model_cache, decoding=DecodingOptions("yue"))
        )


def test_transcribe_takes_the_language_and_task_of_each_call(german: Path, model_cache: Path) -> None:
    """`Quantized.transcribe(audio, language=..., task=...)`, as openai/whisper's transcribe takes them: a model
    opened with the defaults (English) transcribes German speech as German when told, or detected."""
    quantized = Quantized.build("base", get_recipe("ct2-int8"), Settings(cache_dir=model_cache, threads=2))
    clip = german / "0.wav"
    as_english, as_german = quantized.transcribe(clip), quantized.transcribe(clip, language="de")
    assert quantized.transcribe(clip, language="auto") == as_german != as_english
    assert {"sonne", "kinder"} <= set(as_german.lower().replace(",", " ").replace(".", " ").split())
    translated = quantized.transcribe(clip, language="de", task="translate").lower()
    assert "children" in translated and "kinder" not in translated
