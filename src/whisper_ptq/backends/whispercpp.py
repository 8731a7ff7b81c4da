"""whisper.cpp, the ggml C/C++ runtime most CPU deployments of Whisper ship, run through `pywhispercpp` (whose
wheel bundles libwhisper and ggml's CPU kernels).

`quantize` converts the loaded transformers model to whisper.cpp's ggml model file the way whisper.cpp's own
`models/convert-h5-to-ggml.py` does (magic, hparams, mel filters, vocabulary, then each tensor with its
whisper.cpp name), and quantizes it the way `examples/quantize` does: every 2-D tensor except the positional
embeddings (and the conv biases, 2-D in the file) becomes the one block type of the format. That includes the
token embedding, which whisper.cpp also uses as the output projection: there is no keeping the LM head. 1-D
tensors, the conv biases and the positional embeddings stay f32, the conv weights (3-D) f16.

The block formats are quantized by `gguf.quants` (numpy, bit-identical to ggml's reference quantizers) for
q8_0/q5_0/q5_1/q4_0/q4_1. gguf has no k-quant quantizer, so q2_k..q6_k call ggml's own `ggml_quantize_chunk`
(what `examples/quantize` calls) in the libggml that pywhispercpp bundles. k-quant blocks hold 256 values: a
model whose rows are not a multiple of 256 (tiny's width is 384) cannot be stored in them.

Numerics: ggml's CPU matmul rounds the activations to the weight's "vec_dot" type before multiplying: to f16
for f16 weights, to 8-bit blocks (q8_0/q8_1, q8_K for k-quants) for block formats, so f16 is not an exact
replay of fp32 and the block formats are int8-activation schemes, not weight-only ones. Attention runs with
whisper.cpp's default flash attention over an f16 KV cache; `flash_attn=false` takes its plain attention path.

Decoding, `decoding=common` (default): `engines.decoding`, the decoding of every other engine, driving
whisper.cpp's encoder and decoder (`engines.whispercpp.WhisperCppTranscriber`: `whisper_set_mel` with
transformers' log-mel, `whisper_encode`, then `whisper_decode` one token at a time with its KV cache, the
logits read back). The alternative, one `whisper_full` call per 30-s window with a prompt, would not be that
decoding: whisper_full applies its own rules to every window (it suppresses the task and language tokens and
<|notimestamps|>, has its own timestamp rules and no-speech skip, stops at n_text_ctx / 2 - 4 = 220 tokens, and
seeks within the window by itself), so its windows could not be compared with the other engines' token for
token. Through the low-level calls the prompts, suppressed tokens, token limits, OpenAI's timestamp rules and
long-form seek loop, `--language`/`--task`, temperature fallback and previous-text conditioning are the shared
ones, and only the arithmetic is whisper.cpp's. The search is greedy (a step-wise engine): no beam search.
`decoding=native`: whisper.cpp's own loop, `whisper_full` over the waveform (`WhisperCppNative`: its log-mel,
rules, long form and text), from `whisper_full_default_params(GREEDY)` with only the study's options mapped
onto its parameters; what whisper.cpp users get, not a like-for-like comparison with the other engines.

The export is the ggml file itself: `pywhispercpp.model.Model("<dir>/ggml-model-<format>.bin")` opens it, as
does `whisper-cli -m`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import math
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import Backend, BuildContext, Built, Param
from whisper_ptq.errors import UserError
from whisper_ptq.recipes import OptionValue, Recipe

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class GgmlFormat:
    """One whisper.cpp model format: the type of its 2-D weights and how that type stores them."""

    ftype: int  # ggml.h `enum ggml_ftype`, the file header's type code (gguf has llama's ftypes, not these)
    quantizer: str  # "float", "gguf" (gguf's numpy block quantizer) or "ggml" (ggml_quantize_chunk in libggml)
    weights: str  # Recipe.weights
    group_size: int | None = None  # values sharing one scale (k-quants: the sub-blocks of a 256-value block)
    symmetric: bool = True  # no per-group minimum


# No all-f32 format: whisper.cpp's encoder convolution (ggml_conv_1d) always builds an f16 im2col, and ggml's CPU
# im2col asserts an f16 kernel, so an f32 model aborts on the first audio (whisper.cpp issue #2557).
FORMATS = {
    "f16": GgmlFormat(1, "float", "fp16"),
    "q8_0": GgmlFormat(7, "gguf", "int8", 32),
    "q5_1": GgmlFormat(9, "gguf", "int5", 32, symmetric=False),
    "q5_0": GgmlFormat(8, "gguf", "int5", 32),
    "q4_1": GgmlFormat(3, "gguf", "int4", 32, symmetric=False),
    "q4_0": GgmlFormat(2, "gguf", "int4", 32),
    "q6_k": GgmlFormat(14, "ggml", "int6", 16),
    "q5_k": GgmlFormat(13, "ggml", "int5", 32, symmetric=False),
    "q4_k": GgmlFormat(12, "ggml", "int4", 32, symmetric=False),
    "q3_k": GgmlFormat(11, "ggml", "int3", 16),
    "q2_k": GgmlFormat(10, "ggml", "int2", 16, symmetric=False),
}
DECODINGS = ("common", "native")

GGML_FILE_MAGIC = 0x67676D6C  # "ggml"
# examples/quantize writes GGML_QNT_VERSION * GGML_QNT_VERSION_FACTOR + ftype into a quantized file's header.
GGML_QNT_VERSION, GGML_QNT_VERSION_FACTOR = 2, 1000
# Kept f32 by convert-h5-to-ggml.py and skipped by examples/quantize although 2-D in the file.
F32_TENSORS = (
    "encoder.conv1.bias",
    "encoder.conv2.bias",
    "encoder.positional_embedding",
    "decoder.positional_embedding",
)
TOKEN_EMBEDDING = "decoder.token_embedding.weight"
CONV_WEIGHTS = ("encoder.conv1.weight", "encoder.conv2.weight")
LINEAR_WEIGHTS = (".key.weight", ".query.weight", ".value.weight", ".out.weight", ".mlp.0.weight", ".mlp.2.weight")
# convert-h5-to-ggml.py's `conv_map`: transformers module names -> whisper.cpp (OpenAI checkpoint) names.
NAME_MAP = {
    "self_attn.k_proj": "attn.key",
    "self_attn.q_proj": "attn.query",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
    "encoder.layer_norm.bias": "encoder.ln_post.bias",
    "encoder.layer_norm.weight": "encoder.ln_post.weight",
    "encoder.embed_positions.weight": "encoder.positional_embedding",
    "decoder.layer_norm.bias": "decoder.ln.bias",
    "decoder.layer_norm.weight": "decoder.ln.weight",
    "decoder.embed_positions.weight": "decoder.positional_embedding",
    "decoder.embed_tokens.weight": TOKEN_EMBEDDING,
}


class WhisperCppBackend(Backend):
    library = "whispercpp"
    description = "whisper.cpp (ggml): its model file, ggml block formats q8_0..q4_0 and k-quants, CPU kernels"
    requires = {"pywhispercpp": "pywhispercpp", "gguf": "gguf"}
    # Both decodings search greedily: the common one is step-wise (engines.decoding.StepDecoding), and the native
    # one is not offered whisper.cpp's beam search, which would be a search of its own, unlike the other engines'.
    beam_search = False
    params = {
        "format": Param(str, "q5_0", tuple(FORMATS), "ggml type of every 2-D weight, token embedding included"),
        "decoding": Param(
            str, "common", DECODINGS, "common: the decoding of every engine; native: whisper.cpp's own (whisper_full)"
        ),
        "flash_attn": Param(bool, True, help="whisper.cpp's flash attention (its default); false: plain attention"),
    }
    named = {
        "whispercpp-f16": (
            "whisper.cpp f16 weights, no quantization (the format of its published models)",
            {"format": "f16"},
        ),
        "whispercpp-q8_0": ("whisper.cpp q8_0: int8 blocks of 32, one fp16 scale each", {"format": "q8_0"}),
        "whispercpp-q5_1": ("whisper.cpp q5_1: 5-bit blocks of 32, fp16 scale and minimum", {"format": "q5_1"}),
        "whispercpp-q5_0": ("whisper.cpp q5_0: 5-bit symmetric blocks of 32, fp16 scale", {"format": "q5_0"}),
        "whispercpp-q4_1": ("whisper.cpp q4_1: 4-bit blocks of 32, fp16 scale and minimum", {"format": "q4_1"}),
        "whispercpp-q4_0": ("whisper.cpp q4_0: 4-bit symmetric blocks of 32, fp16 scale", {"format": "q4_0"}),
        "whispercpp-q6_k": ("whisper.cpp q6_k: 6-bit k-quant, super-blocks of 256 (not tiny)", {"format": "q6_k"}),
        "whispercpp-q5_k": ("whisper.cpp q5_k: 5-bit k-quant, super-blocks of 256 (not tiny)", {"format": "q5_k"}),
        "whispercpp-q4_k": ("whisper.cpp q4_k: 4-bit k-quant, super-blocks of 256 (not tiny)", {"format": "q4_k"}),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        fmt_name, decoding, flash = str(values["format"]), str(values["decoding"]), bool(values["flash_attn"])
        fmt = FORMATS[fmt_name]
        quantized = fmt.quantizer != "float"
        return Recipe(
            name=name,
            library=self.library,
            scheme="dynamic" if quantized else "reference",
            weights=fmt.weights,
            activations="int8" if quantized else None,
            granularity="per-group" if quantized else "per-tensor",
            group_size=fmt.group_size,
            symmetric=fmt.symmetric,
            devices=("cpu",),
            options=(("decoding", decoding), ("flash_attn", flash), ("format", fmt_name)),
            description=description
            or f"whisper.cpp {fmt_name}, {decoding} decoding{'' if flash else ', no flash attention'}",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        if recipe.modules or recipe.keep:
            raise UserError(
                f"recipe {recipe.name!r}: whisper.cpp stores every weight matrix in one type, it cannot select modules"
            )
        fmt_name = str(recipe.option("format"))
        workspace = tempfile.TemporaryDirectory(prefix="whisper-ptq-ggml-")
        path = Path(workspace.name) / model_file_name(fmt_name)
        write_ggml(bundle.model, bundle.processor, fmt_name, path)
        transcriber = make_transcriber(path, bundle, recipe, workspace)
        return Built(transcriber, path, whispercpp_info(transcriber, read_model_file(path)))

    def save(self, quantized: Built, out_dir: Path) -> None:
        """The ggml file alone: whisper.cpp and pywhispercpp load it as is, and its bytes are the size."""
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(quantized.model, out_dir / quantized.model.name)

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        path = saved_dir / model_file_name(str(recipe.option("format")))
        if not path.is_file():
            raise UserError(f"{saved_dir} holds no whisper.cpp model ({path.name} is missing)")
        stored = read_model_file(path)
        if stored.format != recipe.option("format"):
            raise UserError(
                f"{path} is a whisper.cpp {stored.format} model, but its recipe says {recipe.option('format')}"
            )
        transcriber = make_transcriber(path, bundle, recipe)
        return Built(transcriber, path, whispercpp_info(transcriber, stored))


def model_file_name(fmt_name: str) -> str:
    return f"ggml-model-{fmt_name}.bin"


# ------------------------------------------------------------------------------------------- conversion


def ggml_name(hf_name: str) -> str:
    """A transformers state-dict key as whisper.cpp names the tensor (convert-h5-to-ggml.py's mapping)."""
    parts = hf_name.split(".")[1:]  # drop the leading "model."
    if parts[1] == "layers":
        return ".".join([parts[0], "blocks", parts[2], NAME_MAP[".".join(parts[3:-1])], parts[-1]])
    name = ".".join(parts)
    return NAME_MAP.get(name, name)


def tensor_type(name: str, ndim: int, fmt_name: str) -> str:
    """The ggml type a tensor is stored in (see the module docstring for whisper.cpp's rules)."""
    if ndim < 2 or name in F32_TENSORS:
        return "f32"
    return fmt_name if ndim == 2 else "f16"


def vocabulary(tokenizer: Any) -> list[bytes]:
    """The text tokens (ids below <|endoftext|>) as raw bytes, as convert-pt-to-ggml.py writes them from
    OpenAI's tiktoken file; whisper.cpp names the special tokens after them itself."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    tokens = tokenizer.convert_ids_to_tokens(list(range(tokenizer.eos_token_id)))
    return [bytes(byte_of[char] for char in token) for token in tokens]


def write_ggml(model: Any, processor: Any, fmt_name: str, path: Path) -> None:
    """Write `model` (a transformers WhisperForConditionalGeneration) as a whisper.cpp model file."""
    import numpy as np
    import torch

    config = model.config
    if not torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight):
        raise UserError("whisper.cpp uses the token embedding as output projection; this model's proj_out differs")
    fmt = FORMATS[fmt_name]
    header_ftype = fmt.ftype if fmt.quantizer == "float" else GGML_QNT_VERSION * GGML_QNT_VERSION_FACTOR + fmt.ftype
    hparams = (
        config.vocab_size,
        config.max_source_positions,
        config.d_model,
        config.encoder_attention_heads,
        config.encoder_layers,
        config.max_target_positions,
        config.d_model,
        config.decoder_attention_heads,
        config.decoder_layers,
        config.num_mel_bins,
        header_ftype,
    )
    # transformers computes the same Slaney mel filters as OpenAI's mel_filters.npz, as (n_freq, n_mels).
    filters = np.ascontiguousarray(np.asarray(processor.feature_extractor.mel_filters, np.float32).T)
    with path.open("wb") as out:
        out.write(struct.pack("12i", GGML_FILE_MAGIC, *hparams))
        out.write(struct.pack("2i", *filters.shape) + filters.tobytes())
        tokens = vocabulary(processor.tokenizer)
        out.write(struct.pack("i", len(tokens)))
        for token in tokens:
            out.write(struct.pack("i", len(token)) + token)
        for hf_name, tensor in model.state_dict().items():
            if hf_name == "proj_out.weight":  # tied to the token embedding (checked above), stored once
                continue
            name = ggml_name(hf_name)
            data = tensor.detach().to("cpu", torch.float32).numpy()
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                data = data.reshape(-1, 1)
            kind = tensor_type(name, data.ndim, fmt_name)
            type_id, payload = encode(name, data, kind)
            encoded = name.encode()
            out.write(struct.pack(f"{3 + data.ndim}i", data.ndim, len(encoded), type_id, *reversed(data.shape)))
            out.write(encoded)
            out.write(payload.tobytes())


def encode(name: str, data: np.ndarray, kind: str) -> tuple[int, np.ndarray]:
    """(ggml type id, stored bytes) of one tensor in ggml type `kind`; rows are the last axis."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind.upper()]
    if kind == "f32":
        return qtype, data.astype(np.float32)
    if kind == "f16":
        return qtype, data.astype(np.float16)
    block = GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        raise UserError(
            f"ggml {kind} stores rows in blocks of {block} values, but {name} has rows of {data.shape[-1]}: "
            "whisper.cpp cannot hold this model in that format (q8_0, q5_0, q5_1, q4_0, q4_1 use blocks of 32)"
        )
    # whisper.cpp quantizes its f16 file (examples/quantize reads f16 values; a quantized model needs f16 conv
    # kernels, so an f32 file cannot be its source): round to f16 first, a no-op for OpenAI's f16 release.
    data = data.astype(np.float16).astype(np.float32)
    if FORMATS[kind].quantizer == "gguf":
        return qtype, quants.quantize(data, qtype)
    return qtype, ggml_quantize(data, qtype)


def ggml_quantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """Quantize rows with ggml's own `ggml_quantize_chunk` (no importance matrix), the call whisper.cpp's
    examples/quantize makes, in the libggml pywhispercpp bundles. Used where gguf has no numpy quantizer."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES

    from whisper_ptq.engines.whispercpp import bundled_library

    lib = bundled_library("libggml-base")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    rows = np.ascontiguousarray(data.reshape(-1, data.shape[-1]), np.float32)
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    out = np.empty((rows.shape[0], rows.shape[1] // block * block_bytes), np.uint8)
    written = lib.ggml_quantize_chunk(
        int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None
    )
    assert written == out.nbytes, (written, out.nbytes)
    return out


@dataclass
class ModelFile:
    """What a whisper.cpp model file holds: its hparams, format and every tensor's type, shape and bytes."""

    hparams: dict[str, int]
    format: str
    tensors: dict[str, tuple[str, tuple[int, ...], int]]  # name -> (ggml type, shape as ne[0..], bytes)

    def types(self, names: Any) -> list[str]:
        return sorted({self.tensors[name][0] for name in names})


def read_model_file(path: Path) -> ModelFile:
    """Walk a whisper.cpp model file as whisper_model_load reads it (header, mel filters, vocabulary, then one
    record per tensor), refusing a file that ends early: whisper.cpp itself accepts a file without tensors."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as f:

        def ints(count: int) -> tuple[int, ...]:
            raw = f.read(4 * count)
            if len(raw) != 4 * count:
                raise UserError(f"{path} is truncated: it is not a complete whisper.cpp model file")
            return struct.unpack(f"{count}i", raw)

        magic, *values = ints(12)
        if magic != GGML_FILE_MAGIC:
            raise UserError(f"{path} is not a whisper.cpp model file (bad magic)")
        keys = ("n_vocab", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_text_ctx")
        keys += ("n_text_state", "n_text_head", "n_text_layer", "n_mels", "ftype")
        hparams = dict(zip(keys, values, strict=True))
        n_mel, n_fft = ints(2)
        f.seek(4 * n_mel * n_fft, 1)
        for _ in range(ints(1)[0]):
            f.seek(ints(1)[0], 1)
        tensors: dict[str, tuple[str, tuple[int, ...], int]] = {}
        while header := f.read(12):
            ndim, length, type_id = struct.unpack("3i", header)
            shape = ints(ndim)
            name = f.read(length).decode()
            qtype = GGMLQuantizationType(type_id)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(shape) // block * block_bytes
            f.seek(nbytes, 1)
            tensors[name] = (qtype.name.lower(), shape, nbytes)
        if f.tell() != path.stat().st_size:  # seek passes the end of a truncated file silently
            raise UserError(f"{path} is truncated: it is not a complete whisper.cpp model file")
    ftype = hparams["ftype"] % GGML_QNT_VERSION_FACTOR
    fmt_name = next((name for name, fmt in FORMATS.items() if fmt.ftype == ftype), f"ftype {ftype}")
    return ModelFile(hparams, fmt_name, tensors)


def make_transcriber(path: Path, bundle: Any, recipe: Recipe, workspace: Any = None) -> Any:
    import torch

    from whisper_ptq.engines.whispercpp import WhisperCppNative, WhisperCppTranscriber

    threads, flash_attn = torch.get_num_threads(), bool(recipe.option("flash_attn"))
    if recipe.option("decoding") == "native":
        multilingual = bool(getattr(bundle.model.generation_config, "is_multilingual", False))
        return WhisperCppNative(path, multilingual, threads, flash_attn, workspace)
    return WhisperCppTranscriber(path, bundle.model, bundle.processor, threads, flash_attn, workspace)


def whispercpp_info(transcriber: Any, stored: ModelFile) -> dict[str, Any]:
    """Engine, kernels, what the model file stores and how it decodes."""
    from whisper_ptq.engines.whispercpp import WhisperCppNative, library_version, system_info

    linear = [name for name in stored.tensors if name.endswith(LINEAR_WEIGHTS)]
    others = set(stored.tensors) - {*linear, TOKEN_EMBEDDING, *CONV_WEIGHTS}
    return {
        "engine": f"whisper.cpp {library_version()} (pywhispercpp {importlib.metadata.version('pywhispercpp')})",
        "cpu_kernels": system_info(),
        "ggml_format": stored.format,
        "stored_types": {
            "linear": stored.types(linear),
            "token_embedding": stored.types([TOKEN_EMBEDDING]),
            "conv": stored.types(CONV_WEIGHTS),
            "biases_norms_positions": stored.types(others),
        },
        # stored bytes over values of the attention and MLP weight matrices (scales and minimums included)
        "linear_bits_per_weight": 8
        * sum(stored.tensors[name][2] for name in linear)
        / sum(math.prod(stored.tensors[name][1]) for name in linear),
        "flash_attn": transcriber.flash_attn,
        "decoding_loop": "whisper.cpp whisper_full (its own rules)"
        if isinstance(transcriber, WhisperCppNative)
        else "engines.decoding over whisper_encode / whisper_decode",
    }
