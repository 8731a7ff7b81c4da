"""CTranslate2's model.bin, read without CTranslate2, and its exact conversion to transformers.

The reader parses the binary layout that `ctranslate2.specs.model_spec.ModelSpec._serialize` writes (version
6). The converter maps every variable of a Whisper spec to its transformers name (fp16 values are upcast to
fp32, which is lossless), and builds the config, generation config and processor from the model's own files.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,
)

from whisper_ptq.errors import UserError
from whisper_ptq.files import atomic_dir
from whisper_ptq.models.names import ENGLISH_ONLY_VOCAB_SIZE, HEAD
from whisper_ptq.models.sources import CT2_FILES, files_digest, first_line, read_json

# Bump when the conversion output changes, so caches written by an older converter are not reused.
CONVERTER_VERSION = 1

MAX_TARGET_POSITIONS = 448

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h, specs/model_spec.py _dtype_to_type_id).
_CT2_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.float16,
    torch.bfloat16,
)
CT2_BINARY_VERSION = 6


@dataclass
class Ct2Model:
    """The variables of a CTranslate2 model.bin, in their stored dtype; aliases already resolved."""

    spec_name: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]  # alias name -> variable name


class _Cursor:
    """Sequential little-endian reads from a buffer that fail with a UserError instead of reading past it."""

    def __init__(self, buffer: mmap.mmap | bytes, path: Path):
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, size: int) -> memoryview:
        if self.pos + size > len(self.buffer):
            self.fail(f"needs {size} bytes at offset {self.pos} but the file has {len(self.buffer)}")
        view = memoryview(self.buffer)[self.pos : self.pos + size]
        self.pos += size
        return view

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("H")))  # length includes the trailing NUL
        if not raw.endswith(b"\0"):
            self.fail(f"string at offset {self.pos - len(raw)} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"string at offset {self.pos - len(raw)} is not UTF-8")

    def fail(self, why: str) -> NoReturn:
        raise UserError(f"corrupt or truncated CTranslate2 model {self.path}: {why}")


def read_ct2_model(path: Path) -> Ct2Model:
    """Parse model.bin as written by ctranslate2.specs.model_spec.ModelSpec._serialize (binary version 6)."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise UserError(f"corrupt or truncated CTranslate2 model {path}: empty file")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            cursor = _Cursor(buffer, path)
            version = cursor.unpack("I")
            if version != CT2_BINARY_VERSION:
                cursor.fail(f"binary version {version}, expected {CT2_BINARY_VERSION}")
            spec_name, revision = cursor.string(), cursor.unpack("I")
            variables = dict(_read_variable(cursor) for _ in range(cursor.unpack("I")))
            aliases = {cursor.string(): cursor.string() for _ in range(cursor.unpack("I"))}
            if cursor.pos != len(buffer):
                cursor.fail(f"{len(buffer) - cursor.pos} unexpected bytes after the last alias")
    for alias, target in aliases.items():
        if target not in variables:
            raise UserError(f"corrupt CTranslate2 model {path}: alias {alias} -> unknown {target}")
        variables[alias] = variables[target]
    return Ct2Model(spec_name, revision, variables, aliases)


def _read_variable(cursor: _Cursor) -> tuple[str, torch.Tensor]:
    name = cursor.string()
    shape = tuple(cursor.unpack("I") for _ in range(cursor.unpack("B")))
    dtype_id = cursor.unpack("B")
    if dtype_id >= len(_CT2_DTYPES):
        cursor.fail(f"variable {name} has unknown dtype id {dtype_id}")
    dtype = _CT2_DTYPES[dtype_id]
    num_bytes = cursor.unpack("I")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if num_bytes != expected:
        cursor.fail(f"variable {name} {shape} {dtype} declares {num_bytes} bytes, expected {expected}")
    # Copy out of the mmap so the tensor outlives the file; torch (unlike numpy) reads bfloat16 directly.
    data = bytearray(cursor.take(num_bytes))
    tensor = torch.frombuffer(data, dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)
    return name, tensor.reshape(shape)


# --------------------------------------------------------------------------------------------- CT2 -> HF


@dataclass(frozen=True)
class WhisperDims:
    """Architecture of a Whisper checkpoint, read from its weights."""

    n_mels: int
    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int


def whisper_dims(ct2: Ct2Model) -> WhisperDims:
    v = ct2.variables

    def count_layers(prefix: str) -> int:
        pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
        indices = {int(m.group(1)) for name in v if (m := pattern.match(name))}
        if indices != set(range(len(indices))) or not indices:
            raise UserError(f"CTranslate2 Whisper model has non-contiguous {prefix} layers {sorted(indices)}")
        return len(indices)

    try:
        d_model = v["encoder/layer_norm/gamma"].shape[0]
        return WhisperDims(
            n_mels=v["encoder/conv1/weight"].shape[1],
            vocab_size=v["decoder/embeddings/weight"].shape[0],
            d_model=d_model,
            encoder_layers=count_layers("encoder"),
            decoder_layers=count_layers("decoder"),
            encoder_heads=int(v["encoder/num_heads"]),
            decoder_heads=int(v["decoder/num_heads"]),
            encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
            decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
            max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
            max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        )
    except KeyError as exc:
        raise UserError(f"CTranslate2 model is not a Whisper model: it lacks variable {exc.args[0]}") from exc


Take = Callable[[str], torch.Tensor]


class _Taker:
    """Hands out CT2 variables as fp32 by name and remembers which were used, so none is silently dropped."""

    def __init__(self, ct2: Ct2Model):
        self.variables = ct2.variables
        self.used: set[str] = set()
        self.handed: set[int] = set()  # storages already handed out

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.variables:
            raise UserError(f"CTranslate2 Whisper model lacks variable {name}")
        self.used.add(name)
        tensor = self.variables[name]
        if not tensor.is_floating_point():
            raise UserError(f"CTranslate2 variable {name} is {tensor.dtype}: quantized models cannot be converted")
        tensor = tensor.float()
        # CTranslate2 stores equal tensors once (e.g. the zero biases of a fresh model): each weight gets its own,
        # or transformers refuses to save weights that share memory without being tied.
        if tensor.untyped_storage().data_ptr() in self.handed:
            tensor = tensor.clone()
        self.handed.add(tensor.untyped_storage().data_ptr())
        return tensor

    def unused_tensors(self, aliases: dict[str, str]) -> list[str]:
        # Scalars (rank 0) are layer attributes like num_heads or activation, not weights.
        return [n for n, t in self.variables.items() if t.dim() > 0 and n not in self.used and n not in aliases]


def ct2_state_dict(ct2: Ct2Model, dims: WhisperDims) -> dict[str, torch.Tensor]:
    """Map every CT2 tensor to its transformers name, splitting the fused attention projections."""
    take = _Taker(ct2)
    state: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        state[f"{enc}.{conv}.weight"] = take(f"encoder/{conv}/weight")
        state[f"{enc}.{conv}.bias"] = take(f"encoder/{conv}/bias")
    state[f"{enc}.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    state.update(_layer_norm(take, "encoder/layer_norm", f"{enc}.layer_norm"))
    for i in range(dims.encoder_layers):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        state.update(_self_attention(take, f"{src}/self_attention", f"{dst}.self_attn", dims.d_model))
        state.update(_layer_norm(take, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        state.update(_ffn(take, src, dst))

    state[f"{dec}.embed_tokens.weight"] = take("decoder/embeddings/weight")
    state[f"{dec}.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    state.update(_layer_norm(take, "decoder/layer_norm", f"{dec}.layer_norm"))
    for i in range(dims.decoder_layers):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        state.update(_self_attention(take, f"{src}/self_attention", f"{dst}.self_attn", dims.d_model))
        state.update(_layer_norm(take, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        state.update(_cross_attention(take, f"{src}/attention", f"{dst}.encoder_attn", dims.d_model))
        state.update(_layer_norm(take, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
        state.update(_ffn(take, src, dst))

    # transformers ties proj_out to embed_tokens; an untied CT2 projection would be lost, so refuse it.
    projection = ct2.aliases.get("decoder/projection/weight")
    if projection != "decoder/embeddings/weight":
        raise UserError("CTranslate2 Whisper model has an output projection not tied to the embeddings")
    if leftover := take.unused_tensors(ct2.aliases):
        raise UserError(f"CTranslate2 Whisper model has unexpected variables: {', '.join(leftover[:5])}")
    return state


def _layer_norm(take: Take, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": take(f"{src}/gamma"), f"{dst}.bias": take(f"{src}/beta")}


def _linear(take: Take, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": take(f"{src}/weight"), f"{dst}.bias": take(f"{src}/bias")}


def _ffn(take: Take, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {
        **_layer_norm(take, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm"),
        **_linear(take, f"{src}/ffn/linear_0", f"{dst}.fc1"),
        **_linear(take, f"{src}/ffn/linear_1", f"{dst}.fc2"),
    }


def _split_fused(take: Take, src: str, dst: str, names: tuple[str, ...], d_model: int) -> dict[str, torch.Tensor]:
    """Split a fused projection (q/k/v or k/v) into one transformers Linear per name."""
    weight, bias = take(f"{src}/weight"), take(f"{src}/bias")
    if weight.shape != (len(names) * d_model, d_model):
        raise UserError(f"CTranslate2 variable {src}/weight has shape {tuple(weight.shape)}")
    state = {}
    for name, w, b in zip(names, weight.split(d_model), bias.split(d_model), strict=True):
        state[f"{dst}.{name}.weight"] = w.clone()
        if name == "k_proj":
            # Whisper's key projection has no bias; CT2's fuse_linear fills that slice with zeros.
            if torch.any(b != 0):
                raise UserError(f"CTranslate2 variable {src}/bias has a nonzero key bias; not a Whisper model")
        else:
            state[f"{dst}.{name}.bias"] = b.clone()
    return state


def _self_attention(take: Take, src: str, dst: str, d_model: int) -> dict[str, torch.Tensor]:
    return {
        **_split_fused(take, f"{src}/linear_0", dst, ("q_proj", "k_proj", "v_proj"), d_model),
        **_linear(take, f"{src}/linear_1", f"{dst}.out_proj"),
    }


def _cross_attention(take: Take, src: str, dst: str, d_model: int) -> dict[str, torch.Tensor]:
    return {
        **_linear(take, f"{src}/linear_0", f"{dst}.q_proj"),
        **_split_fused(take, f"{src}/linear_1", dst, ("k_proj", "v_proj"), d_model),
        **_linear(take, f"{src}/linear_2", f"{dst}.out_proj"),
    }


def _whisper_config(dims: WhisperDims, tokens: dict[str, int]) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.n_mels,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_heads,
        decoder_attention_heads=dims.decoder_heads,
        encoder_ffn_dim=dims.encoder_ffn_dim,
        decoder_ffn_dim=dims.decoder_ffn_dim,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        decoder_start_token_id=tokens["<|startoftranscript|>"],
        bos_token_id=tokens["<|endoftext|>"],
        eos_token_id=tokens["<|endoftext|>"],
        pad_token_id=tokens["<|endoftext|>"],
        # The generation config is their one home: WhisperConfig's default begin_suppress_tokens are the
        # English-only ids, and transformers warns when the model config carries generation parameters.
        suppress_tokens=None,
        begin_suppress_tokens=None,
        scale_embedding=False,
        tie_word_embeddings=True,
    )


def _generation_config(dims: WhisperDims, tokens: dict[str, int], ct2_config: dict) -> GenerationConfig:
    multilingual = dims.vocab_size > ENGLISH_ONLY_VOCAB_SIZE
    endoftext = tokens["<|endoftext|>"]
    config = GenerationConfig(
        decoder_start_token_id=tokens["<|startoftranscript|>"],
        bos_token_id=endoftext,
        eos_token_id=endoftext,
        pad_token_id=endoftext,
        max_length=MAX_TARGET_POSITIONS,
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", []),
        no_timestamps_token_id=tokens["<|notimestamps|>"],
        prev_sot_token_id=tokens["<|startofprev|>"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
        alignment_heads=[list(pair) for pair in ct2_config.get("alignment_heads", [])],
    )
    if multilingual:
        lang_ids = set(ct2_config.get("lang_ids", []))
        config.lang_to_id = {name: i for name, i in tokens.items() if i in lang_ids}
        config.task_to_id = {"transcribe": tokens["<|transcribe|>"], "translate": tokens["<|translate|>"]}
    return config


_REQUIRED_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startofprev|>",
    "<|notimestamps|>",
)


def _tokenizer(tokenizer_json: Path) -> tuple[WhisperTokenizerFast, dict[str, int]]:
    """The tokenizer and its special-token ids (by name), read from tokenizer.json."""
    try:
        added = json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"]
        tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_json), pad_token="<|endoftext|>")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"invalid tokenizer {tokenizer_json}: {first_line(exc)}") from exc
    tokens = {token["content"]: token["id"] for token in added if token.get("special")}
    if missing := [name for name in _REQUIRED_SPECIAL_TOKENS if name not in tokens]:
        raise UserError(f"tokenizer {tokenizer_json} lacks Whisper special tokens {', '.join(missing)}")
    return tokenizer, tokens


def ct2_cache_key(ct2_dir: Path) -> str:
    """Hash of the source files' contents and the converter version: a changed source gets a new key."""
    return files_digest((ct2_dir / name for name in CT2_FILES), f"whisper-ptq-ct2-converter-{CONVERTER_VERSION}")


def converted_dir(ct2_dir: Path, cache_dir: Path) -> Path:
    """The transformers copy of a CTranslate2 model dir, converting it into the cache on first use."""
    for name in CT2_FILES:
        if not (ct2_dir / name).is_file():
            raise UserError(f"CTranslate2 model directory {ct2_dir} lacks {name}")
    target = cache_dir / "converted" / ct2_cache_key(ct2_dir)
    if not (target / "config.json").is_file():
        with atomic_dir(target) as tmp:
            convert_ct2(ct2_dir, tmp)
    return target


def convert_ct2(ct2_dir: Path, out_dir: Path) -> None:
    """Write the CTranslate2 Whisper model in `ct2_dir` as a transformers model + processor into `out_dir`."""
    ct2 = read_ct2_model(ct2_dir / "model.bin")
    if ct2.spec_name != "WhisperSpec":
        raise UserError(f"{ct2_dir / 'model.bin'} holds a {ct2.spec_name}, not a Whisper model")
    ct2_config = read_json(ct2_dir / "config.json")
    tokenizer, tokens = _tokenizer(ct2_dir / "tokenizer.json")
    dims = whisper_dims(ct2)
    state = ct2_state_dict(ct2, dims)

    # Build on the meta device: random init of large-v3 would cost seconds only to be overwritten.
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(_whisper_config(dims, tokens))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != {f"{HEAD}.weight"}:
        raise UserError(f"conversion of {ct2_dir} left weights unmatched: {missing + unexpected}")
    model.tie_weights()
    model.generation_config = _generation_config(dims, tokens, ct2_config)
    model.save_pretrained(out_dir)
    feature_extractor = WhisperFeatureExtractor(feature_size=dims.n_mels)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
