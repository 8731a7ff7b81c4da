"""Tests of model resolution, the CTranslate2 reader and the exact CT2 -> transformers conversion."""

from __future__ import annotations

import re
import shutil
import struct
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch
from huggingface_hub import constants as hub_constants

from whisper_ptq.errors import UserError
from whisper_ptq.models import ct2_format, sources
from whisper_ptq.models.ct2_format import Ct2Model, ct2_cache_key, read_ct2_model
from whisper_ptq.models.loading import WhisperBundle, load_model
from whisper_ptq.models.sources import PACKAGED_MODELS, PackagedModel, ct2_model_dir, resolve_model

UTTERANCE = "librispeech/test-clean/1089/134686/1089-134686-0000"


@pytest.fixture(scope="module")
def tiny_en(model_cache: Path) -> WhisperBundle:
    return load_model("tiny.en", model_cache)


@pytest.fixture(scope="module")
def base(model_cache: Path) -> WhisperBundle:
    return load_model("base", model_cache)


@pytest.fixture(scope="module")
def tiny_en_ct2() -> Ct2Model:
    return read_ct2_model(ct2_model_dir(resolve_model("tiny.en")) / "model.bin")


def copy_ct2_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_ct2(path: Path, ct2: Ct2Model) -> None:
    """Serialize like ctranslate2's ModelSpec._serialize (binary version 6), to craft test inputs."""
    dtype_ids = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}

    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    stored = {name: t for name, t in ct2.variables.items() if name not in ct2.aliases}
    out = [struct.pack("<I", 6), string(ct2.spec_name), struct.pack("<II", ct2.revision, len(stored))]
    for name, tensor in stored.items():
        data = tensor.contiguous().numpy().tobytes()
        out += [string(name), struct.pack("<B", tensor.dim()), struct.pack(f"<{tensor.dim()}I", *tensor.shape)]
        out += [struct.pack("<BI", dtype_ids[tensor.dtype], len(data)), data]
    out.append(struct.pack("<I", len(ct2.aliases)))
    out += [string(alias) + string(target) for alias, target in ct2.aliases.items()]
    path.write_bytes(b"".join(out))


# --------------------------------------------------------------------------------------------- exactness

# transformers name pattern -> (CT2 name template, chunk index into a fused tensor or None, number of chunks).
# Layer rules match "model.<stack>.layers.<i>." and map to "<stack>/layer_<i>/".
_LAYER, _CT2_LAYER = r"model\.(\w+)\.layers\.(\d+)\.", "{0}/layer_{1}/"
_LAYER_RULES: list[tuple[str, str, int | None, int]] = [
    (r"self_attn\.q_proj\.(weight|bias)", "self_attention/linear_0/{2}", 0, 3),
    (r"self_attn\.k_proj\.(weight)", "self_attention/linear_0/{2}", 1, 3),
    (r"self_attn\.v_proj\.(weight|bias)", "self_attention/linear_0/{2}", 2, 3),
    (r"self_attn\.out_proj\.(weight|bias)", "self_attention/linear_1/{2}", None, 1),
    (r"encoder_attn\.q_proj\.(weight|bias)", "attention/linear_0/{2}", None, 1),
    (r"encoder_attn\.k_proj\.(weight)", "attention/linear_1/{2}", 0, 2),
    (r"encoder_attn\.v_proj\.(weight|bias)", "attention/linear_1/{2}", 1, 2),
    (r"encoder_attn\.out_proj\.(weight|bias)", "attention/linear_2/{2}", None, 1),
    (r"self_attn_layer_norm\.(weight)", "self_attention/layer_norm/gamma", None, 1),
    (r"self_attn_layer_norm\.(bias)", "self_attention/layer_norm/beta", None, 1),
    (r"encoder_attn_layer_norm\.(weight)", "attention/layer_norm/gamma", None, 1),
    (r"encoder_attn_layer_norm\.(bias)", "attention/layer_norm/beta", None, 1),
    (r"final_layer_norm\.(weight)", "ffn/layer_norm/gamma", None, 1),
    (r"final_layer_norm\.(bias)", "ffn/layer_norm/beta", None, 1),
    (r"fc1\.(weight|bias)", "ffn/linear_0/{2}", None, 1),
    (r"fc2\.(weight|bias)", "ffn/linear_1/{2}", None, 1),
]
_RULES: list[tuple[str, str, int | None, int]] = [
    (r"model\.encoder\.(conv[12])\.(weight|bias)", "encoder/{0}/{1}", None, 1),
    (r"model\.(encoder|decoder)\.embed_positions\.weight", "{0}/position_encodings/encodings", None, 1),
    (r"model\.decoder\.embed_tokens\.weight", "decoder/embeddings/weight", None, 1),
    (r"proj_out\.weight", "decoder/embeddings/weight", None, 1),
    (r"model\.(encoder|decoder)\.layer_norm\.weight", "{0}/layer_norm/gamma", None, 1),
    (r"model\.(encoder|decoder)\.layer_norm\.bias", "{0}/layer_norm/beta", None, 1),
    *((_LAYER + hf, _CT2_LAYER + ct2, chunk, chunks) for hf, ct2, chunk, chunks in _LAYER_RULES),
]


def expected_source(hf_name: str, ct2: Ct2Model) -> tuple[str, torch.Tensor]:
    """The CT2 variable a transformers parameter must equal, per an independent copy of the name mapping."""
    for pattern, template, chunk, chunks in _RULES:
        if match := re.fullmatch(pattern, hf_name):
            ct2_name = template.format(*match.groups())
            tensor = ct2.variables[ct2_name]
            return ct2_name, tensor if chunk is None else tensor.chunk(chunks)[chunk]
    raise AssertionError(f"no CT2 source for transformers parameter {hf_name}")


@pytest.mark.parametrize("spec", ["tiny.en", "base"])
def test_conversion_is_exact_tensor_for_tensor(spec: str, model_cache: Path, request: pytest.FixtureRequest):
    bundle: WhisperBundle = request.getfixturevalue(spec.replace(".", "_"))
    ct2 = read_ct2_model(ct2_model_dir(bundle.source) / "model.bin")
    used = set()
    for name, param in bundle.model.state_dict().items():
        ct2_name, source = expected_source(name, ct2)
        used.add(ct2_name)
        assert param.dtype == torch.float32
        assert param.shape == source.shape, name
        assert torch.equal(param, source.float()), f"{name} differs from {ct2_name}"
    weights = {name for name, t in ct2.variables.items() if t.dim() > 0 and name not in ct2.aliases}
    assert used == weights


def test_fused_attention_is_split_into_q_k_v(tiny_en: WhisperBundle, tiny_en_ct2: Ct2Model):
    d = tiny_en.model.config.d_model
    fused_w = tiny_en_ct2.variables["encoder/layer_2/self_attention/linear_0/weight"].float()
    fused_b = tiny_en_ct2.variables["encoder/layer_2/self_attention/linear_0/bias"].float()
    attn = tiny_en.model.model.encoder.layers[2].self_attn
    assert torch.equal(attn.q_proj.weight, fused_w[:d]) and torch.equal(attn.q_proj.bias, fused_b[:d])
    assert torch.equal(attn.k_proj.weight, fused_w[d : 2 * d]) and attn.k_proj.bias is None
    assert torch.equal(attn.v_proj.weight, fused_w[2 * d :]) and torch.equal(attn.v_proj.bias, fused_b[2 * d :])
    assert not fused_b[d : 2 * d].any()  # CT2 fills the missing key bias with zeros
    cross_w = tiny_en_ct2.variables["decoder/layer_1/attention/linear_1/weight"].float()
    cross = tiny_en.model.model.decoder.layers[1].encoder_attn
    assert torch.equal(cross.k_proj.weight, cross_w[:d]) and torch.equal(cross.v_proj.weight, cross_w[d:])
    # transformers scales queries at run time; CT2 must not have pre-scaled them (it does not for Whisper)
    assert attn.scaling == pytest.approx((d // tiny_en.model.config.encoder_attention_heads) ** -0.5)


def test_reader_round_trips_model_bin_byte_for_byte(tiny_en_ct2: Ct2Model, tmp_path: Path):
    source = ct2_model_dir(resolve_model("tiny.en")) / "model.bin"
    assert tiny_en_ct2.spec_name == "WhisperSpec" and tiny_en_ct2.revision == 3
    assert tiny_en_ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert tiny_en_ct2.variables["decoder/embeddings/weight"].dtype == torch.float16  # dtype id 4
    assert tiny_en_ct2.variables["encoder/num_heads"].dtype == torch.int16  # attributes are scalars
    write_ct2(tmp_path / "model.bin", tiny_en_ct2)
    assert (tmp_path / "model.bin").read_bytes() == source.read_bytes()


# --------------------------------------------------------------------------------------------- loading


def test_packaged_models_load_with_architecture_from_weights(tiny_en: WhisperBundle, base: WhisperBundle):
    tiny_cfg, base_cfg = tiny_en.model.config, base.model.config
    assert (tiny_cfg.encoder_layers, tiny_cfg.decoder_layers, tiny_cfg.d_model) == (4, 4, 384)
    assert (tiny_cfg.encoder_attention_heads, tiny_cfg.encoder_ffn_dim, tiny_cfg.num_mel_bins) == (6, 1536, 80)
    assert (base_cfg.encoder_layers, base_cfg.decoder_layers, base_cfg.d_model) == (6, 6, 512)
    assert (base_cfg.encoder_attention_heads, base_cfg.encoder_ffn_dim) == (8, 2048)
    assert (tiny_cfg.vocab_size, base_cfg.vocab_size) == (51864, 51865)
    assert tiny_en.english_only and not base.english_only
    for bundle in (tiny_en, base):
        assert bundle.source.kind == "packaged" and not bundle.model.training
        assert bundle.model.dtype == torch.float32
        assert bundle.model.proj_out.weight.data_ptr() == bundle.model.model.decoder.embed_tokens.weight.data_ptr()
        assert bundle.hf_dir is not None and (bundle.hf_dir / "model.safetensors").is_file()


def test_generation_config(tiny_en: WhisperBundle, base: WhisperBundle):
    tiny_gen, base_gen = tiny_en.model.generation_config, base.model.generation_config
    assert (tiny_gen.decoder_start_token_id, tiny_gen.eos_token_id, tiny_gen.no_timestamps_token_id) == (
        50257,
        50256,
        50362,
    )
    assert tiny_gen.begin_suppress_tokens == [220, 50256] and not tiny_gen.is_multilingual
    assert (base_gen.decoder_start_token_id, base_gen.eos_token_id, base_gen.no_timestamps_token_id) == (
        50258,
        50257,
        50363,
    )
    assert base_gen.is_multilingual and base_gen.lang_to_id["<|en|>"] == 50259 and len(base_gen.lang_to_id) == 99
    assert base_gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert base_gen.max_length == 448 and len(base_gen.alignment_heads) == 8


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


@pytest.mark.parametrize(
    ("spec", "kwargs"),
    [("tiny.en", {}), pytest.param("base", {"language": "en", "task": "transcribe"}, marks=pytest.mark.slow)],
)
def test_greedy_transcription_of_a_real_utterance(
    spec: str, kwargs: dict, shared_data: Path, request: pytest.FixtureRequest
):
    import jiwer

    bundle: WhisperBundle = request.getfixturevalue(spec.replace(".", "_"))
    audio, rate = sf.read(shared_data / f"{UTTERANCE}.flac", dtype="float32")
    assert rate == 16000
    transcripts = (shared_data / UTTERANCE).with_name("1089-134686.trans.txt").read_text().splitlines()
    reference = dict(line.split(" ", 1) for line in transcripts)[Path(UTTERANCE).name]
    features = bundle.processor(audio, sampling_rate=rate, return_tensors="pt").input_features
    with torch.inference_mode():
        tokens = bundle.model.generate(features, **kwargs)
    hypothesis = bundle.processor.batch_decode(tokens, skip_special_tokens=True)[0]
    wer = jiwer.wer(" ".join(_words(reference)), " ".join(_words(hypothesis)))
    assert wer < 0.2, hypothesis


def test_local_transformers_dir_loads_with_from_pretrained(tiny_en: WhisperBundle, model_cache: Path):
    assert tiny_en.hf_dir is not None
    bundle = load_model(str(tiny_en.hf_dir), model_cache)
    assert bundle.source.kind == "transformers" and bundle.hf_dir == tiny_en.hf_dir.resolve()
    assert torch.equal(bundle.model.proj_out.weight, tiny_en.model.proj_out.weight)


def test_local_ct2_dir_is_converted(tiny_en: WhisperBundle, model_cache: Path):
    ct2_dir = ct2_model_dir(tiny_en.source)
    bundle = load_model(str(ct2_dir), model_cache)
    assert bundle.source.kind == "ct2" and bundle.hf_dir == tiny_en.hf_dir  # same content, same cache entry


# --------------------------------------------------------------------------------------------- cache


def test_second_load_does_not_reconvert(tiny_en: WhisperBundle, model_cache: Path, monkeypatch):
    def fail(*_args):
        raise AssertionError("converted again")

    monkeypatch.setattr(ct2_format, "convert_ct2", fail)
    assert load_model("tiny.en", model_cache).hf_dir == tiny_en.hf_dir


@pytest.mark.parametrize("changed", ["config.json", "model.bin"])
def test_changed_source_gets_a_new_cache_key(changed: str, tmp_path: Path):
    original = ct2_model_dir(resolve_model("tiny.en"))
    copy = copy_ct2_dir(original, tmp_path / "tiny")
    with open(copy / changed, "r+b") as file:
        file.seek(-2, 2)  # the end of model.bin is weight data; of config.json, whitespace
        byte = file.read(1)
        file.seek(-2, 2)
        file.write(bytes([byte[0] ^ 1]) if changed == "model.bin" else b" ")
    assert ct2_cache_key(copy) != ct2_cache_key(original)


def test_packaged_base_is_assembled_once(model_cache: Path, base: WhisperBundle):
    path = ct2_model_dir(resolve_model("base", model_cache))
    assert path == model_cache / "packaged" / "base"
    mtime = (path / "model.bin").stat().st_mtime_ns
    assert (path / "model.bin").stat().st_size == 2 * 72608766
    assert resolve_model("base", model_cache).path == path
    assert (path / "model.bin").stat().st_mtime_ns == mtime


def test_default_cache_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("WHISPER_PTQ_CACHE", str(tmp_path / "env"))
    assert sources.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert sources.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("WHISPER_PTQ_CACHE")
    assert sources.default_cache_dir().name == "whisper-ptq"


# --------------------------------------------------------------------------------------------- bad input


def test_unknown_name_lists_packaged_models():
    with pytest.raises(UserError, match=r"'tiny-xl'.*base, tiny\.en"):
        resolve_model("tiny-xl")


def test_missing_directory_is_named(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_directory_of_neither_format(tmp_path: Path):
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path))} is neither a transformers"):
        load_model(str(tmp_path), tmp_path / "cache")


def test_missing_tokenizer_json(tmp_path: Path):
    copy = copy_ct2_dir(ct2_model_dir(resolve_model("tiny.en")), tmp_path / "tiny")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="lacks tokenizer.json"):
        load_model(str(copy), tmp_path / "cache")


def _ct2_dir_with_model_bin(tmp_path: Path, data: bytes) -> Path:
    copy = tmp_path / "ct2"
    copy.mkdir()
    source = ct2_model_dir(resolve_model("tiny.en"))
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(source / name, copy / name)
    (copy / "model.bin").write_bytes(data)
    return copy


def test_truncated_model_bin(tmp_path: Path):
    source = ct2_model_dir(resolve_model("tiny.en")) / "model.bin"
    with open(source, "rb") as file:
        head = file.read(1 << 20)
    copy = _ct2_dir_with_model_bin(tmp_path, head)
    with pytest.raises(UserError, match=r"truncated CTranslate2 model .*model\.bin: .*needs \d+ bytes"):
        load_model(str(copy), tmp_path / "cache")
    assert not list((tmp_path / "cache" / "converted").iterdir())  # no half-written cache entry


def test_bad_binary_version(tmp_path: Path):
    copy = _ct2_dir_with_model_bin(tmp_path, struct.pack("<I", 99) + b"\0" * 64)
    with pytest.raises(UserError, match="binary version 99, expected 6"):
        load_model(str(copy), tmp_path / "cache")


def test_nonzero_fused_key_bias_is_refused(tiny_en_ct2: Ct2Model, tmp_path: Path):
    variables = dict(tiny_en_ct2.variables)
    name = "decoder/layer_0/self_attention/linear_0/bias"
    bias = variables[name].clone()
    bias[400] = 1.0  # inside the key slice [384, 768)
    variables[name] = bias
    copy = _ct2_dir_with_model_bin(tmp_path, b"")
    write_ct2(copy / "model.bin", Ct2Model("WhisperSpec", 3, variables, tiny_en_ct2.aliases))
    with pytest.raises(UserError, match=f"{name} has a nonzero key bias"):
        load_model(str(copy), tmp_path / "cache")


def test_packaged_model_without_its_package(monkeypatch):
    fake = PackagedModel(pip_packages=("fake-whisper",), parts=(("no_such_module_xyz", "data", ("model.bin",)),))
    monkeypatch.setitem(PACKAGED_MODELS, "fake", fake)
    with pytest.raises(UserError, match="pip install fake-whisper"):
        resolve_model("fake")


HUB_ID = "openai/whisper-not-a-real-test-model"


def test_hub_id_offline_fails_fast_naming_alternatives(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE.*base, tiny\.en.*transformers.*CTranslate2"):
        load_model(HUB_ID)
    assert time.monotonic() - start < 10


def test_hub_id_unreachable_fails_fast(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "https://127.0.0.1:9")  # discard port: refused at once
    start = time.monotonic()
    with pytest.raises(UserError, match=r"127\.0\.0\.1:9 is unreachable.*base, tiny\.en"):
        load_model(HUB_ID)
    assert time.monotonic() - start < 10
