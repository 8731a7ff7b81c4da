"""A lean greedy Whisper transcriber for CPUs: int8 GEMMs and a hand-written decode loop, with each part's
kernels chosen for the CPU it runs on (`backends.fastcpu.KERNEL_PLANS`).

Why not `HFTranscriber`: transformers' `generate` spends a decoding step on Python (cache objects, logits
processors, ~40 small ops per layer), on the fp32 LM head (26.5M weights read per token for whisper-base) and
on rows that already finished. This module reuses the model's weights but runs its own forward passes:

- linears are one of `LINEAR_KINDS`: `DynamicInt8Linear` (int8 per-output-channel weights, fbgemm's prepacked
  dynamic int8 linear, one activation scale per call or per row: the fastest kernel measured for the
  decoder's few-row GEMMs on every x86 class, and for the encoder's on AVX2), or `FloatLinear` (bf16 on AMX,
  or fp32).
- q/k/v projections are fused into one GEMM, Whisper's query scaling (1/8, a power of two) is folded into the
  q weights, the cross-attention keys/values are computed once per utterance, the self-attention KV cache is
  preallocated and written in place.
- the encoder runs one utterance per call; its attention is one of `ENCODER_ATTENTION`.
- the LM head is `ShortlistHead`: an int8 GEMV picks the top candidates, which are re-scored in fp32 against
  the untouched fp32 embedding.
- decoding is ragged: an utterance leaves the batch at its `<|endoftext|>` and its cache rows are dropped;
  a step's cross-attention is two plain GEMMs (`cross_attention`), cheaper than the flash kernel for one query,
  or bf16 flash attention on AMX (`bf16_cross_attention`).

The search is `engines.decoding.StepDecoding`'s (transformers' Whisper rules: the same prompts, suppressed tokens,
length limits, OpenAI's timestamp rules for long form; greedy): this module only supplies the encoder and the
decoder steps. With fp32 linears and head the output equals transformers' token for token
(tests/test_backend_fastcpu.py, tests/test_families.py).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whisper_ptq.engines.decoding import Logits, StepDecoding, StepRules, keep_rows, torch_threads, transcribe
from whisper_ptq.settings import DecodingOptions

# Guards the per-row scale of an all-zero row (the int8 values are then all zero anyway).
MIN_SCALE = 1e-12
SHORTLIST = 8  # candidates the int8 LM head passes to the exact fp32 re-scoring


# ----------------------------------------------------------------------------------------------- linears


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, shape (rows, 1), never below MIN_SCALE."""
    return x.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, fp32 scales of shape (rows, 1))."""
    scale = row_absmax(x) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


class DynamicInt8Linear(nn.Module):
    """y = x W^T + b through fbgemm's prepacked dynamic int8 linear (`quantized::linear_dynamic`): int8
    per-output-channel weights, activations quantized per call with one scale for all rows. Why not
    `torch._int_mm` (oneDNN, per-row activation scales): for the 1-8 rows of a decoding step it pays oneDNN's
    per-call setup, while fbgemm's packed GEMV does not (36 decoder linears of whisper-base,
    2 threads, one row: fbgemm 1.3-1.8 ms, `_int_mm` 3.1-4.2 ms, fp32 3.1-4.3 ms on an AMX Xeon; forced to
    AVX2, fbgemm 2.2 ms, fp32 4.1 ms). `seven_bit`: activations in 7 bits (fbgemm's `reduce_range`), which a
    CPU without VNNI needs, since its 8-bit multiply-adds (vpmaddubsw) saturate their 16-bit pair sums.
    `per_row`: one activation scale per row, for the encoder's 1500 frames, where one scale for the whole window
    costs accuracy (speech and padding frames differ in range). fbgemm takes one scale a call, so each row is
    divided by its max-abs before the call and the output multiplied back after it (the bias added then).
    Measured for whisper-base, 100 test-other utterances, forced AVX2 on a Zen 4: WER 13.89 with one scale a
    window, 11.58 with a call per block of 100 frames, 10.69 per block of 25, 10.38 per row (fp32 10.95); an
    encoder window 376 ms in calls of 25 frames, 353 ms per row, 484 ms with fp32 linears."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        seven_bit: bool = False,
        per_row: bool = False,
    ):
        super().__init__()
        qweight, scale = quantize_rows(weight.detach().float())
        self.seven_bit = seven_bit
        self.per_row = per_row
        self.register_buffer("weight", qweight.contiguous())
        self.register_buffer("weight_scale", scale.view(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.pack()
        self.register_load_state_dict_post_hook(lambda module, keys: module.pack())

    def pack(self) -> None:
        """fbgemm's packed weight from the buffers (again after a state dict is loaded into them)."""
        zeros = torch.zeros(self.weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch deprecates quantized tensors; fbgemm's linear still takes one
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(self.weight, self.weight_scale.double(), zeros, 0)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None if self.per_row else self.bias)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if self.per_row:
            scale = row_absmax(rows)
            y = torch.ops.quantized.linear_dynamic(rows / scale, self.packed, self.seven_bit)
            y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
        else:
            y = torch.ops.quantized.linear_dynamic(rows, self.packed, self.seven_bit)
        return y.view(*x.shape[:-1], -1)


class FloatLinear(nn.Module):
    """A plain linear in fp32 or bf16 (oneDNN, AVX-512 BF16) over (possibly fused) weights: the higher
    precision for sensitive layers. Input and output stay fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).float()


LINEAR_KINDS: dict[str, Callable[[torch.Tensor, torch.Tensor | None], nn.Module]] = {
    "int8-dynamic": DynamicInt8Linear,
    "int8-dynamic-7bit": lambda weight, bias: DynamicInt8Linear(weight, bias, seven_bit=True),
    "int8-dynamic-7bit-rows": lambda weight, bias: DynamicInt8Linear(weight, bias, True, per_row=True),
    "bf16": lambda weight, bias: FloatLinear(weight, bias, torch.bfloat16),
    "fp32": FloatLinear,
}


def fused_linear(parts: Sequence[nn.Linear], kind: str, scales: Sequence[float] = ()) -> nn.Module:
    """One linear computing the concatenated outputs of `parts`; `scales` multiplies each part's output
    (exact for Whisper's 1/8 query scaling, a power of two). Missing biases become zeros."""
    scales = list(scales) or [1.0] * len(parts)
    if len(parts) == 1 and scales[0] == 1.0:  # nothing to fuse or scale: share the weights, copy nothing
        return LINEAR_KINDS[kind](parts[0].weight.detach(), None if parts[0].bias is None else parts[0].bias.detach())
    weight = torch.cat([p.weight.detach() * s for p, s in zip(parts, scales, strict=True)])
    if all(p.bias is None for p in parts):
        bias = None
    else:
        bias = torch.cat(
            [
                p.bias.detach() * s if p.bias is not None else torch.zeros(p.out_features)
                for p, s in zip(parts, scales, strict=True)
            ]
        )
    return LINEAR_KINDS[kind](weight, bias)


# ----------------------------------------------------------------------------------------------- encoder


# Chooses the kind (a key of LINEAR_KINDS) of a fused linear from the transformers names of its parts.
KindOf = Callable[[Sequence[str]], str]


def fused(module: nn.Module, prefix: str, names: Sequence[str], kind_of: KindOf, scales: Sequence[float] = ()):
    """The fused linear over `module`'s children `names` (transformers module `prefix` + name)."""
    return fused_linear([module.get_submodule(n) for n in names], kind_of([f"{prefix}.{n}" for n in names]), scales)


def convert_layers(layers: nn.ModuleList, convert: Callable[[nn.Module, int], nn.Module]) -> nn.ModuleList:
    """Convert transformers layers one by one, emptying each slot as soon as its fast twin exists: the model's
    fp32 linears are freed as they are replaced, so no second copy of the model is ever held."""
    converted = []
    for index in range(len(layers)):
        converted.append(convert(layers[index], index))
        layers[index] = nn.Identity()
    return nn.ModuleList(converted)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused fp32 attention (q pre-scaled); ATen's CPU flash kernel."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def sdpa_bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused attention in bf16: with AMX, ATen's CPU flash kernel runs its GEMMs on the tiles
    (whisper-base, one layer, 2 threads: 12 ms against 26 ms in fp32)."""
    return F.scaled_dot_product_attention(*(t.to(torch.bfloat16) for t in (q, k, v)), scale=1.0).float()


ENCODER_ATTENTION = {"sdpa": sdpa_attention, "sdpa-bf16": sdpa_bf16_attention}


class FastEncoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, prefix: str, kind_of: KindOf, attention: str):
        super().__init__()
        self.heads = layer.self_attn.num_heads
        self.attention = ENCODER_ATTENTION[attention]
        self.attn_norm, self.ffn_norm = layer.self_attn_layer_norm, layer.final_layer_norm
        qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        self.qkv = fused(layer, prefix, qkv, kind_of, (layer.self_attn.scaling, 1.0, 1.0))
        self.out = fused(layer, prefix, ["self_attn.out_proj"], kind_of)
        self.fc1, self.fc2 = fused(layer, prefix, ["fc1"], kind_of), fused(layer, prefix, ["fc2"], kind_of)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, width = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(batch, frames, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = self.attention(qkv[0], qkv[1], qkv[2])
        x = x + self.out(attended.transpose(1, 2).reshape(batch, frames, width))
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


class FastEncoder(nn.Module):
    """Whisper's encoder (conv stem, sinusoidal positions, pre-norm layers) over the HF module's weights."""

    def __init__(
        self, encoder: nn.Module, prefix: str, kind_of: KindOf, attention: str, stem: torch.dtype = torch.float32
    ):
        super().__init__()
        # The conv stem is converted in place (the model is consumed anyway, see FastTranscriber).
        self.conv1, self.conv2 = encoder.conv1.to(stem), encoder.conv2.to(stem)
        self.register_buffer("positions", encoder.embed_positions.weight.detach())
        self.layers = convert_layers(
            encoder.layers, lambda layer, i: FastEncoderLayer(layer, f"{prefix}.layers.{i}", kind_of, attention)
        )
        self.norm = encoder.layer_norm

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))))
        # contiguous: else every later op inherits the conv's frames-last strides (strided adds and norms, a copy
        # before each linear: 30% of the encoder's time)
        x = x.transpose(1, 2).contiguous().float() + self.positions
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------- decoder


# Cross-attention keys and values of one layer, laid out as the layer's `CROSS_ATTENTION` kind keeps them.
CrossKV = tuple[torch.Tensor, torch.Tensor]


def transposed_cross_kv(keys: torch.Tensor, values: torch.Tensor) -> CrossKV:
    """fp32, the keys transposed (batch, heads, head_dim, frames): a step's q @ keys reads them in order."""
    return keys.transpose(2, 3).contiguous(), values.contiguous()


def cross_attention(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of a decoding step's few queries (pre-scaled) over the 1500 encoder frames: two batched GEMMs
    and a softmax, ~40% faster than ATen's fp32 CPU flash kernel, whose blocking does not pay for one query
    (measured for 8 heads x 1 x 1500: 0.14 vs 0.24 ms, with the keys stored transposed; over the ~30 keys of
    self-attention flash wins)."""
    return torch.softmax(q @ keys_t, dim=-1) @ values


def bf16_cross_kv(keys: torch.Tensor, values: torch.Tensor) -> CrossKV:
    return keys.to(torch.bfloat16).contiguous(), values.to(torch.bfloat16).contiguous()


def bf16_cross_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The same in bf16 through ATen's flash kernel (fp32 accumulation and softmax): half the bytes, and the
    1500 frames' keys and values are what a step reads most at batch 8 (6 layers of whisper-base, 2 threads,
    AMX Xeon: batch 1 0.94 ms against 1.12 for `cross_attention`, batch 8 9.9 against 15.8)."""
    return F.scaled_dot_product_attention(q.to(torch.bfloat16), keys, values, scale=1.0).float()


# kind -> (how a layer keeps its cross keys/values, how a step attends over them)
CROSS_ATTENTION = {"fp32": (transposed_cross_kv, cross_attention), "bf16": (bf16_cross_kv, bf16_cross_attention)}


class FastDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, prefix: str, kind_of: KindOf, cross: str = "fp32"):
        super().__init__()
        self.keep_cross, self.attend_cross = CROSS_ATTENTION[cross]
        self.heads = layer.self_attn.num_heads
        self.attn_norm, self.cross_norm, self.ffn_norm = (
            layer.self_attn_layer_norm,
            layer.encoder_attn_layer_norm,
            layer.final_layer_norm,
        )
        qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        self.qkv = fused(layer, prefix, qkv, kind_of, (layer.self_attn.scaling, 1.0, 1.0))
        self.out = fused(layer, prefix, ["self_attn.out_proj"], kind_of)
        self.cross_q = fused(layer, prefix, ["encoder_attn.q_proj"], kind_of, (layer.encoder_attn.scaling,))
        self.cross_kv = fused(layer, prefix, ["encoder_attn.k_proj", "encoder_attn.v_proj"], kind_of)
        self.cross_out = fused(layer, prefix, ["encoder_attn.out_proj"], kind_of)
        self.fc1, self.fc2 = fused(layer, prefix, ["fc1"], kind_of), fused(layer, prefix, ["fc2"], kind_of)

    def heads_view(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, width) -> (batch, heads, length, head_dim)"""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def cross_keys_values(self, encoded: torch.Tensor) -> CrossKV:
        """One utterance at a time, then joined: laying out a whole batch's keys and values at once (8 x 3 MB
        each, strided) ran out of cache and took 0.65 s of a 16-utterance batch-8 run, forced AVX2 on a Zen 4."""
        parts = [
            self.keep_cross(*(self.heads_view(t) for t in self.cross_kv(row[None]).chunk(2, dim=-1))) for row in encoded
        ]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([keys for keys, _ in parts]), torch.cat([values for _, values in parts])

    def forward(self, x: torch.Tensor, start: int, cache: LayerCache, cross: CrossKV) -> torch.Tensor:
        """x: (active rows, new tokens, width) at positions start..; writes their keys/values into `cache`,
        whose rows are those of x (the decoding loop drops finished rows from both)."""
        active, length, width = x.shape
        end = start + length
        q, k, v = (self.heads_view(t) for t in self.qkv(self.attn_norm(x)).chunk(3, dim=-1))
        cache.keys[:, :, start:end] = k
        cache.values[:, :, start:end] = v
        # Causal masking matters only inside the prompt (several new tokens); one new token sees all.
        keys, values = cache.keys[:, :, :end], cache.values[:, :, :end]
        attended = F.scaled_dot_product_attention(q, keys, values, is_causal=length > 1, scale=1.0)
        x = x + self.out(attended.transpose(1, 2).reshape(active, length, width))
        q = self.heads_view(self.cross_q(self.cross_norm(x)))
        attended = self.attend_cross(q, *cross)
        x = x + self.cross_out(attended.transpose(1, 2).reshape(active, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


@dataclass
class LayerCache:
    keys: torch.Tensor  # (active rows, heads, max_length, head_dim)
    values: torch.Tensor

    def keep(self, rows: Sequence[int]) -> LayerCache:
        return LayerCache(*keep_rows((self.keys, self.values), rows))


class ShortlistHead(nn.Module):
    """The LM head tied to the fp32 token embedding, in two stages.

    An int8 GEMV (`rough`, a linear of `LINEAR_KINDS` over the embedding: a quarter of the fp32 bytes) gives
    approximate logits of the whole vocabulary: the decoding rules (suppressed tokens, timestamp rules) and the
    log-probabilities work on those; its top `SHORTLIST` candidates after the rules are re-scored in fp32 with
    the fp32 embedding rows, and the token is chosen among them by those exact logits. The fp32 argmax is in
    the shortlist unless the int8 error exceeds the gap between the best and the 8th-best logit, so decisions
    are those of the fp32 head.
    """

    def __init__(self, embedding: nn.Parameter, rough: str):
        super().__init__()
        self.embedding = embedding  # the model's own fp32 parameter, shared, not copied
        self.rough = LINEAR_KINDS[rough](embedding, None)

    def forward(self, hidden: torch.Tensor) -> Logits:
        """hidden: (rows, width) fp32 -> approximate logits, and the fp32 re-scoring of a shortlist."""

        def shortlist(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            candidates = masked.topk(SHORTLIST, dim=-1).indices
            return candidates, torch.einsum("bd,bkd->bk", hidden, self.embedding[candidates])

        return Logits(self.rough(hidden), shortlist)


class FloatHead(nn.Module):
    """The fp32 LM head as transformers computes it: every logit in fp32."""

    def __init__(self, embedding: nn.Parameter):
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> Logits:
        return Logits(F.linear(hidden, self.embedding))


def lm_head(embedding: nn.Parameter, kind: str) -> nn.Module:
    """`kind`: "fp32" (`FloatHead`), or the `LINEAR_KINDS` key of `ShortlistHead`'s int8 pass."""
    return FloatHead(embedding) if kind == "fp32" else ShortlistHead(embedding, kind)


class FastDecoder(nn.Module):
    def __init__(self, decoder: nn.Module, prefix: str, kind_of: KindOf, head_kind: str, cross: str = "fp32"):
        super().__init__()
        self.embed_tokens = decoder.embed_tokens
        self.register_buffer("positions", decoder.embed_positions.weight.detach())
        self.layers = convert_layers(
            decoder.layers, lambda layer, i: FastDecoderLayer(layer, f"{prefix}.layers.{i}", kind_of, cross)
        )
        self.norm = decoder.layer_norm
        self.head = lm_head(decoder.embed_tokens.weight, head_kind)

    def cross_keys_values(self, encoded: torch.Tensor) -> list[CrossKV]:
        return [layer.cross_keys_values(encoded) for layer in self.layers]

    def new_cache(self, batch: int, max_length: int) -> list[LayerCache]:
        heads, width = self.layers[0].heads, self.positions.shape[1]
        shape = (batch, heads, max_length, width // heads)
        return [LayerCache(torch.empty(shape), torch.empty(shape)) for _ in self.layers]

    def forward(self, tokens: torch.Tensor, start: int, cache: list[LayerCache], cross: list[CrossKV]) -> torch.Tensor:
        """tokens: (active rows, new) at positions start.. -> the final hidden state of the last new token,
        (active rows, width)."""
        x = self.embed_tokens(tokens) + self.positions[start : start + tokens.shape[1]]
        for layer, layer_cache, layer_cross in zip(self.layers, cache, cross, strict=True):
            x = layer(x, start, layer_cache, layer_cross)
        return self.norm(x[:, -1])


# ----------------------------------------------------------------------------------------------- transcriber


class FastTranscriber(StepDecoding):
    """A step-wise engine (`engines.decoding.StepModel`) over `FastEncoder` + `FastDecoder`; the search and the
    decoding rules are `StepDecoding`'s, the same as every step-wise engine's. See the module docstring for
    what makes it fast.

    The transformers model is consumed: its encoder and decoder layers are emptied as they are converted.
    `kind_of` picks each fused linear's kind from its transformers module names, `head_kind` the LM head's,
    `attention` the encoder's attention (`ENCODER_ATTENTION`), `cross` the decoder's cross-attention
    (`CROSS_ATTENTION`), `stem` the dtype of the encoder's conv stem; `decoder_threads` is the intra-op thread
    count of the decoding loop (None: the process's).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        kind_of: KindOf,
        head_kind: str,
        attention: str = "sdpa",
        stem: torch.dtype = torch.float32,
        decoder_threads: int | None = None,
        cross: str = "fp32",
    ):
        self.processor = processor
        self.multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
        self.max_target_positions = int(model.config.max_target_positions)
        self.generation_config = model.generation_config
        self.rules = StepRules.from_model(model)
        self.encoder = FastEncoder(model.model.encoder, "model.encoder", kind_of, attention, stem).eval()
        self.decoder = FastDecoder(model.model.decoder, "model.decoder", kind_of, head_kind, cross).eval()
        self.decoder_threads = decoder_threads

    def modules(self) -> Iterator[nn.Module]:
        """Every module of the encoder and the decoder."""
        yield from self.encoder.modules()
        yield from self.decoder.modules()

    def threads(self) -> contextlib.AbstractContextManager[None]:
        return torch_threads(self.decoder_threads)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """One utterance at a time: the encoder is compute-bound at batch 1 already (1500 frames a GEMM)."""
        return torch.cat([self.encoder(row[None]) for row in features])

    def start(self, encoded: torch.Tensor, prompt: torch.Tensor, max_length: int) -> tuple[Logits, Any]:
        cross = self.decoder.cross_keys_values(encoded)
        cache = self.decoder.new_cache(encoded.shape[0], max_length)
        return self.decoder.head(self.decoder(prompt, 0, cache, cross)), (cache, cross)

    def step(self, tokens: torch.Tensor, position: int, state: Any) -> Logits:
        cache, cross = state
        return self.decoder.head(self.decoder(tokens, position, cache, cross))

    def keep(self, state: Any, rows: list[int]) -> Any:
        """Finished rows leave the caches once, in place (`keep_rows`)."""
        cache, cross = state
        return [c.keep(rows) for c in cache], [tuple(keep_rows(kv, rows)) for kv in cross]

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        return [t.text for t in transcribe(self, audios, DecodingOptions())]
