"""whisper.cpp backend on the packaged tiny.en and real LibriSpeech test-clean utterances.

The f16 conversion must transcribe like the transformers fp32 model (the converter's cross-check, under the
shared decoding), the block formats must shrink the file and still transcribe, a recording over 30 s must be
transcribed whole by both decodings, and the saved file must open in pywhispercpp alone.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from whisper_ptq.backends import BuildContext, Built, backend_for, get_recipe
from whisper_ptq.data import open_dataset
from whisper_ptq.engines.decoding import transcribe
from whisper_ptq.engines.hf import HFTranscriber
from whisper_ptq.errors import UserError
from whisper_ptq.models.loading import WhisperBundle, load_model
from whisper_ptq.preflight import check_decoding
from whisper_ptq.recipes import Recipe
from whisper_ptq.results.metrics import corpus_rates, score_utterance
from whisper_ptq.settings import DecodingOptions

pytest.importorskip("pywhispercpp")
gguf = pytest.importorskip("gguf")

from whisper_ptq.backends.whispercpp import ggml_quantize, read_model_file  # noqa: E402
from whisper_ptq.engines.whispercpp import WhisperCppNative, WhisperCppTranscriber, libwhisper  # noqa: E402

SHORTEST_THREE = (4, 1, 7)  # indices into the sorted test-clean sample, 2 to 4.8 s each
LONG = "librispeech:test-clean+concat:seconds=45,within=dataset"  # its first recording: 40.9 s, 103 words


@pytest.fixture(scope="module")
def bundle(model_cache: Path) -> WhisperBundle:
    # The converter only reads the bundle's model: one bundle serves all.
    return load_model("tiny.en", model_cache)


@pytest.fixture(scope="module")
def clips(shared_data: Path) -> tuple[list[np.ndarray], list[str]]:
    dataset = open_dataset("librispeech:test-clean", shared_data)
    chosen = [dataset.utterances[i] for i in SHORTEST_THREE]
    return [dataset.load_audio(u) for u in chosen], [u.text for u in chosen]


@pytest.fixture(scope="module")
def long_recording(shared_data: Path) -> tuple[np.ndarray, str]:
    dataset = open_dataset(LONG, shared_data)
    first = dataset.utterances[0]
    return dataset.load_audio(first), first.text


def convert(bundle: WhisperBundle, name: str) -> tuple[Recipe, Built]:
    recipe = get_recipe(name)
    assert backend_for(recipe).check(recipe, "cpu") is None
    return recipe, backend_for(recipe).quantize(bundle, recipe, BuildContext())


def wer(references: list[str], hypotheses: list[str]) -> float:
    return corpus_rates(score_utterance(r, h) for r, h in zip(references, hypotheses, strict=True))[0]


@pytest.fixture(scope="module")
def f16(bundle: WhisperBundle) -> tuple[Recipe, Built]:
    return convert(bundle, "whispercpp-f16")


def test_context_params_layout_matches_whisper_h() -> None:
    """The ctypes mirror of `whisper_context_params` reads the library's defaults as pywhispercpp's binding does."""
    import _pywhispercpp as pw

    ours, theirs = libwhisper().whisper_context_default_params(), pw.whisper_context_default_params()
    for name in ("use_gpu", "flash_attn", "gpu_device", "dtw_token_timestamps", "dtw_n_top", "dtw_mem_size"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_f16_transcribes_like_transformers(bundle: WhisperBundle, f16, clips) -> None:
    recipe, built = f16
    assert isinstance(built.transcriber, WhisperCppTranscriber)
    audios, _ = clips
    expected = HFTranscriber(bundle.model, bundle.processor).transcribe(audios)
    assert built.transcriber.transcribe(audios) == expected
    assert built.info["ggml_format"] == "f16" and built.info["stored_types"]["linear"] == ["f16"]
    assert built.info["engine"].startswith("whisper.cpp 1.")
    assert built.info["decoding_loop"] == "engines.decoding over whisper_encode / whisper_decode"


def test_q4_0_is_a_third_of_f16_and_still_transcribes(bundle: WhisperBundle, f16, clips) -> None:
    recipe, built = convert(bundle, "whispercpp-q4_0")
    stored = read_model_file(built.model)
    assert stored.format == "q4_0"
    # examples/quantize's rule, read back from the file: every 2-D tensor but the positional embeddings and the
    # conv biases ([n, 1]) is quantized; 1-D tensors stay f32, the conv kernels (3-D) f16
    assert len(stored.tensors) == 7 + 15 * 4 + 4 + 24 * 4  # the tensors whisper_model_load creates for tiny
    assert built.info["stored_types"] == {
        "linear": ["q4_0"],
        "token_embedding": ["q4_0"],
        "conv": ["f16"],
        "biases_norms_positions": ["f32"],
    }
    assert built.info["linear_bits_per_weight"] == 4.5  # 18 bytes per block of 32: 4-bit values, fp16 scale
    ratio = built.model.stat().st_size / f16[1].model.stat().st_size
    assert 0.28 < ratio < 0.36, ratio  # everything 2-D at 4.5 bits instead of 16, the rest (conv, f32) unchanged
    audios, references = clips
    assert wer(references, built.transcriber.transcribe(audios)) < 25


@pytest.mark.parametrize(("fmt", "bits"), [("q8_0", 8.5), ("q5_1", 6.0), ("q5_0", 5.5), ("q4_1", 5.0)])
def test_block_formats_load_and_transcribe(bundle: WhisperBundle, clips, fmt: str, bits: float) -> None:
    _, built = convert(bundle, f"whispercpp-{fmt}")
    assert read_model_file(built.model).format == fmt
    assert built.info["stored_types"]["linear"] == [fmt] and built.info["linear_bits_per_weight"] == bits
    audios, references = clips
    assert wer(references, built.transcriber.transcribe(audios)) < 20


def test_gguf_and_ggml_quantizers_agree_on_a_real_weight(bundle: WhisperBundle) -> None:
    """The two quantizer paths (gguf's numpy code for the legacy blocks, ggml's C code for k-quants) produce the
    same bytes, i.e. what whisper.cpp's own examples/quantize would write."""
    weight = bundle.model.model.decoder.layers[0].fc1.weight.detach().numpy()
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_1):
        assert np.array_equal(ggml_quantize(weight, qtype), gguf.quants.quantize(weight, qtype)), qtype.name


def test_k_quants_are_refused_for_rows_of_384(bundle: WhisperBundle) -> None:
    recipe = get_recipe("whispercpp-q4_k")
    with pytest.raises(UserError, match="blocks of 256 values, but encoder.blocks.0.attn.key.weight has rows of 384"):
        backend_for(recipe).quantize(bundle, recipe, BuildContext())


@pytest.mark.slow
def test_long_recording_is_transcribed_whole_by_both_decodings(bundle: WhisperBundle, f16, long_recording) -> None:
    audio, reference = long_recording
    assert len(audio) / 16000 > 40
    [common] = transcribe(f16[1].transcriber, [audio], DecodingOptions())
    [expected] = transcribe(HFTranscriber(bundle.model, bundle.processor), [audio], DecodingOptions())
    assert common.windows == expected.windows >= 2 and common.decoded_seconds == pytest.approx(len(audio) / 16000)
    assert wer([reference], [common.text]) < 15 and not common.hit_token_limit
    assert wer([expected.text], [common.text]) < 5  # f16 under the same long-form loop: near-ties at most
    _, native = convert(bundle, "whispercpp:format=f16,decoding=native")
    assert isinstance(native.transcriber, WhisperCppNative)
    [own] = transcribe(native.transcriber, [audio], DecodingOptions())
    assert own.windows >= 2 and own.language == "en"
    assert wer([reference], [own.text]) < 15


def test_beam_search_is_refused_before_it_runs() -> None:
    for name in ("whispercpp-q8_0", "whispercpp:decoding=native"):
        with pytest.raises(UserError, match="decodes greedily only"):
            check_decoding(get_recipe(name), DecodingOptions(beam_size=2))


RELOAD = """
import json, sys
import numpy as np
from pywhispercpp.model import Model

# whisper_full's defaults but for the fallback, which the study's options leave off
model = Model(sys.argv[1], n_threads=2, print_progress=False, temperature_inc=0.0)
audios = np.load(sys.argv[2])
texts = ["".join(s.text for s in model.transcribe(audios[key])) for key in audios.files]
assert not any(name.startswith("whisper_ptq") for name in sys.modules)
print(json.dumps(texts))
"""


@pytest.mark.slow
def test_saved_file_reloads_alone_in_pywhispercpp(bundle: WhisperBundle, clips, tmp_path: Path) -> None:
    """Native decoding is whisper_full's: a fresh process that knows only pywhispercpp prints the same."""
    recipe, built = convert(bundle, "whispercpp:format=q5_1,decoding=native")
    backend = backend_for(recipe)
    backend.save(built, tmp_path / "weights")
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["ggml-model-q5_1.bin"]
    audios = clips[0][:2]
    texts = built.transcriber.transcribe(audios)
    reloaded = backend.load(bundle, recipe, tmp_path / "weights", BuildContext())
    assert reloaded.transcriber.transcribe(audios) == texts
    np.savez(tmp_path / "audio.npz", *audios)
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "weights" / "ggml-model-q5_1.bin"), str(tmp_path / "audio.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [t.strip() for t in json.loads(out.stdout)] == [t.strip() for t in texts]


def test_export_restores_the_common_decoding(model_cache: Path, clips, tmp_path: Path) -> None:
    import whisper_ptq

    quantized = whisper_ptq.quantize("tiny.en", "whispercpp-q8_0", cache_dir=model_cache)
    quantized.save(tmp_path / "export")
    audio = clips[0][0]
    assert whisper_ptq.load(tmp_path / "export").transcribe(audio) == quantized.transcribe(audio)


def test_load_refuses_a_wrong_or_broken_file(bundle: WhisperBundle, f16, tmp_path: Path) -> None:
    (tmp_path / "ggml-model-q8_0.bin").symlink_to(f16[1].model)
    recipe = get_recipe("whispercpp-q8_0")
    backend = backend_for(recipe)
    with pytest.raises(UserError, match="is a whisper.cpp f16 model, but its recipe says q8_0"):
        backend.load(bundle, recipe, tmp_path, BuildContext())
    with pytest.raises(UserError, match="ggml-model-q5_1.bin is missing"):
        backend.load(bundle, get_recipe("whispercpp-q5_1"), tmp_path, BuildContext())
    # whisper.cpp itself loads a file cut short in its vocabulary, as a model without tensors
    (tmp_path / "ggml-model-f16.bin").write_bytes(f16[1].model.read_bytes()[:100_000])
    with pytest.raises(UserError, match="is truncated"):
        backend.load(bundle, get_recipe("whispercpp-f16"), tmp_path, BuildContext())


def test_module_selection_is_refused(bundle: WhisperBundle) -> None:
    recipe = dataclasses.replace(get_recipe("whispercpp-q8_0"), modules=("fc1",))
    with pytest.raises(UserError, match="cannot select modules"):
        backend_for(recipe).quantize(bundle, recipe, BuildContext())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("whispercpp:format=q3_0", "valid: f16, q8_0"),
        ("whispercpp:format=f32", "valid: f16, q8_0"),
        ("whispercpp:decoding=beam", "valid: common, native"),
        ("whispercpp:bits=4", "unknown parameter 'bits'"),
    ],
)
def test_bad_parameters_are_refused(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_recipe(spec)


def test_recipes_record_format_and_decoding() -> None:
    recipe = get_recipe("whispercpp:format=q4_k,decoding=native")
    assert (recipe.option("format"), recipe.option("decoding")) == ("q4_k", "native")
    assert (recipe.weights, recipe.activations, recipe.group_size, recipe.symmetric) == ("int4", "int8", 32, False)
    assert get_recipe("whispercpp-f16").scheme == "reference"
    assert backend_for(recipe).check(recipe, "cuda") == "whispercpp:format=q4_k,decoding=native runs on cpu, not cuda"


def test_listing_recipes_loads_neither_pywhispercpp_nor_gguf() -> None:
    code = (
        "import sys\n"
        "from whisper_ptq.backends import backend_for, named_recipes\n"
        "assert all(backend_for(r).check(r, 'cpu') is None for n, r in named_recipes().items() if 'whispercpp' in n)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pywhispercpp', '_pywhispercpp', 'gguf')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_k_quant_and_language_on_a_multilingual_model(model_cache: Path, shared_data: Path) -> None:
    """whisper-base's rows (512) fit k-quant blocks; a multilingual model detects the language through
    whisper.cpp's decoder as the shared decoding asks it."""
    bundle = load_model("base", model_cache)
    dataset = open_dataset("librispeech:test-clean", shared_data)
    chosen = [dataset.utterances[i] for i in SHORTEST_THREE]
    audios, references = [dataset.load_audio(u) for u in chosen], [u.text for u in chosen]
    _, built = convert(bundle, "whispercpp-q4_k")
    assert built.info["stored_types"]["linear"] == ["q4_k"]
    transcripts = transcribe(built.transcriber, audios, DecodingOptions(language="auto"))
    assert [t.language for t in transcripts] == ["en"] * 3
    assert wer(references, [t.text for t in transcripts]) < 20
