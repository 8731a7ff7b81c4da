"""A lean greedy Whisper transcriber for CPUs: int8 GEMMs with per-token scales and a hand-written decode loop.

Why not `HFTranscriber`: transformers' `generate` spends a decoding step on Python (cache objects, logits
processors, ~40 small ops per layer), on the fp32 LM head (26.5M weights read per token for whisper-base) and
on rows that already finished. This module reuses the model's weights but runs its own forward passes:

- linears are `Int8Linear`: int8 per-output-channel weights, int8 per-token (per-row) dynamic activations,
  `torch._int_mm` (oneDNN, AVX-512 VNNI). Integer accumulation is exact and every row has its own scale, so a
  row's result does not depend on the other rows of the batch: batched output equals batch-1 output.
  Sensitive layers can stay `FloatLinear` (bf16 or fp32).
- q/k/v projections are fused into one GEMM, Whisper's query scaling (1/8, a power of two) is folded into the
  q weights, the cross-attention keys/values are computed once per utterance, the self-attention KV cache is
  preallocated and written in place.
- the encoder runs one utterance per call (one input shape, so a compiled encoder never recompiles) and its
  attention may use bf16 GEMMs (`bf16_blocked_attention`).
- the LM head is `ShortlistHead`: an int8 GEMV picks the top candidates, which are re-scored in fp32 against
  the untouched fp32 embedding.
- decoding is ragged: an utterance leaves the batch at its `<|endoftext|>` and its cache rows are dropped;
  a step's cross-attention is two plain GEMMs (`cross_attention`), cheaper than the flash kernel for one query.

The decoding rules are those of transformers' Whisper `generate` for short-form English transcription without
timestamps: the same prompt, `suppress_tokens` at every step, `begin_suppress_tokens` at the first generated
position, stop at `<|endoftext|>` or at `max_length` tokens, greedy argmax; the loop is the one every engine with
its own encoder/decoder shares (`engines/decoding.py`). With fp32 linears and head the output equals
transformers' token for token (tests/test_backend_fastcpu.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whisper_ptq.data import SAMPLE_RATE
from whisper_ptq.engines.decoding import DecodingRules, greedy_decode

# Guards the per-row scale of an all-zero row (the int8 values are then all zero anyway).
MIN_SCALE = 1e-12
SHORTLIST = 8  # candidates the int8 LM head passes to the exact fp32 re-scoring


# ----------------------------------------------------------------------------------------------- linears


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, fp32 scales of shape (rows, 1))."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE) / 127.0
    return torch.round(x / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """y = x W^T + b with int8 W (per output channel) and int8 x (per row, quantized at every call)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        qweight, scale = quantize_rows(weight.detach().float())
        # Kept (N, K) and handed to _int_mm as a transposed view: oneDNN is up to 6x faster that way for the
        # one-row GEMMs of decoding than with a materialized (K, N) copy, and as fast for the encoder's.
        self.register_buffer("weight", qweight.contiguous())
        self.register_buffer("weight_scale", scale.view(1, -1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        qx, x_scale = quantize_rows(rows)
        y = torch._int_mm(qx, self.weight.t()).float().mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
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
    "int8": Int8Linear,
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


ATTENTION_BLOCK = 512  # queries per block of bf16_blocked_attention: 8 heads x 512 x 1500 scores, 12 MB bf16


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused fp32 attention (q pre-scaled); ATen's CPU flash kernel."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def bf16_blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention with bf16 GEMMs (oneDNN, AVX-512 BF16) over blocks of `ATTENTION_BLOCK` queries, softmax in
    fp32. Why: ATen's CPU flash kernel has no fast bf16 path without AMX (bf16 is no faster than fp32 there),
    while a plain bf16 GEMM runs about twice the fp32 rate; blocking keeps each block's scores in cache and,
    compiled, inductor fuses the softmax with its casts. Output error about 0.3% of fp32 attention's."""
    batch, heads, frames, width = q.shape
    q, k, v = (t.reshape(batch * heads, frames, width).to(torch.bfloat16) for t in (q, k, v))
    keys = k.transpose(1, 2)
    blocks = [
        torch.bmm(torch.softmax(torch.bmm(q[:, start : start + ATTENTION_BLOCK], keys).float(), -1).bfloat16(), v)
        for start in range(0, frames, ATTENTION_BLOCK)
    ]
    return torch.cat(blocks, dim=1).view(batch, heads, frames, width).float()


ENCODER_ATTENTION = {"sdpa": sdpa_attention, "bf16": bf16_blocked_attention}


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
        x = x.transpose(1, 2).float() + self.positions
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------- decoder


# Cross-attention keys, transposed, and values: (batch, heads, head_dim, frames), (batch, heads, frames, head_dim).
CrossKV = tuple[torch.Tensor, torch.Tensor]


class FastDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, prefix: str, kind_of: KindOf):
        super().__init__()
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
        keys, values = self.cross_kv(encoded).chunk(2, dim=-1)
        return self.heads_view(keys).transpose(2, 3).contiguous(), self.heads_view(values).contiguous()

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
        attended = cross_attention(q, *cross)
        x = x + self.cross_out(attended.transpose(1, 2).reshape(active, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


def cross_attention(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of a decoding step's few queries (pre-scaled) over the 1500 encoder frames: two batched GEMMs
    and a softmax, ~40% faster here than ATen's CPU flash kernel, whose blocking does not pay for one query
    (measured for 8 heads x 1 x 1500: 0.14 vs 0.24 ms, with the keys stored transposed; over the ~30 keys of
    self-attention flash wins)."""
    return torch.softmax(q @ keys_t, dim=-1) @ values


@dataclass
class LayerCache:
    keys: torch.Tensor  # (active rows, heads, max_length, head_dim)
    values: torch.Tensor

    def keep(self, rows: Sequence[int]) -> LayerCache:
        return LayerCache(*keep_rows((self.keys, self.values), rows))


def keep_rows(tensors: Sequence[torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor]:
    """Move `rows` (ascending) to the front of each tensor, in place, and return views of that front: no new
    copy of the caches (3 MB a row and layer of cross-attention keys/values for whisper-base) is allocated.
    Row i is filled from row rows[i] >= i, which has not been overwritten yet."""
    for tensor in tensors:
        for i, row in enumerate(rows):
            if i != row:
                tensor[i].copy_(tensor[row])
    return [tensor[: len(rows)] for tensor in tensors]


class ShortlistHead(nn.Module):
    """Greedy token choice with the LM head tied to the fp32 token embedding.

    An int8 weight-only GEMV in bf16 (`_weight_int8pack_mm`, a quarter of the fp32 bytes) ranks the
    vocabulary; its top `SHORTLIST` candidates are re-scored in fp32 with the fp32 embedding rows, and the best
    of those is the token. The fp32 argmax is in the shortlist unless the int8 error exceeds the gap between
    the best and the 8th-best logit, so decisions are those of the fp32 head.
    """

    def __init__(self, embedding: nn.Parameter):
        super().__init__()
        self.embedding = embedding  # the model's own fp32 parameter, shared, not copied
        qweight, scale = quantize_rows(embedding.detach().float())
        self.register_buffer("weight", qweight.contiguous())
        self.register_buffer("weight_scale", scale.view(-1).to(torch.bfloat16))

    def forward(self, hidden: torch.Tensor, suppress: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, width) fp32 -> (batch,) token ids, never one in `suppress`."""
        rough = torch._weight_int8pack_mm(hidden.to(torch.bfloat16), self.weight, self.weight_scale)
        rough.index_fill_(1, suppress, float("-inf"))
        candidates = rough.topk(SHORTLIST, dim=-1).indices
        exact = torch.einsum("bd,bkd->bk", hidden, self.embedding[candidates])
        return candidates.gather(1, exact.argmax(dim=-1, keepdim=True)).squeeze(1)


class FloatHead(nn.Module):
    """The fp32 LM head as transformers computes it: every logit in fp32, then the argmax."""

    def __init__(self, embedding: nn.Parameter):
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor, suppress: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.embedding)
        return logits.index_fill_(1, suppress, float("-inf")).argmax(dim=-1)


HEAD_KINDS = {"int8": ShortlistHead, "fp32": FloatHead}


class FastDecoder(nn.Module):
    def __init__(self, decoder: nn.Module, prefix: str, kind_of: KindOf, head_kind: str):
        super().__init__()
        self.embed_tokens = decoder.embed_tokens
        self.register_buffer("positions", decoder.embed_positions.weight.detach())
        self.layers = convert_layers(
            decoder.layers, lambda layer, i: FastDecoderLayer(layer, f"{prefix}.layers.{i}", kind_of)
        )
        self.norm = decoder.layer_norm
        self.head = HEAD_KINDS[head_kind](decoder.embed_tokens.weight)

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


class FastDecoderState:
    """The shared loop's `DecoderState` over `FastDecoder`: its preallocated caches, from which finished rows
    are dropped once, in place."""

    def __init__(self, decoder: FastDecoder, encoded: torch.Tensor, max_length: int):
        self.decoder = decoder
        self.cross = decoder.cross_keys_values(encoded)
        self.cache = decoder.new_cache(encoded.shape[0], max_length)

    def step(self, tokens: np.ndarray, start: int, suppress: np.ndarray) -> np.ndarray:
        hidden = self.decoder(torch.from_numpy(tokens), start, self.cache, self.cross)
        return self.decoder.head(hidden, torch.from_numpy(suppress)).numpy()

    def keep(self, rows: list[int]) -> None:
        self.cache = [layer_cache.keep(rows) for layer_cache in self.cache]
        self.cross = [tuple(keep_rows(keys_values, rows)) for keys_values in self.cross]


# ----------------------------------------------------------------------------------------------- transcriber


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` intra-op threads (None: unchanged), restoring the previous number."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class FastTranscriber:
    """`Transcriber` over `FastEncoder` + `FastDecoder`; see the module docstring for what makes it fast.

    The transformers model is consumed: its encoder and decoder layers are emptied as they are converted.
    `kind_of` picks each fused linear's kind from its transformers module names, `head_kind` the LM head's,
    `attention` the encoder's attention (`ENCODER_ATTENTION`), `stem` the dtype of the encoder's conv stem;
    `encoder` may be replaced by a compiled version; `decoder_threads` is the intra-op thread count of the
    decoding loop (None: the process's).
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
    ):
        self.processor = processor
        self.encoder: Callable[[torch.Tensor], torch.Tensor] = FastEncoder(
            model.model.encoder, "model.encoder", kind_of, attention, stem
        ).eval()
        self.decoder = FastDecoder(model.model.decoder, "model.decoder", kind_of, head_kind).eval()
        self.rules = DecodingRules.from_model(model, processor.tokenizer)
        self.decoder_threads = decoder_threads

    def modules(self) -> Iterator[nn.Module]:
        """Every module of the (uncompiled) encoder and the decoder."""
        yield from (m for part in (self.encoder, self.decoder) if isinstance(part, nn.Module) for m in part.modules())

    def features(self, audios: list[np.ndarray]) -> torch.Tensor:
        extracted = self.processor.feature_extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return extracted.input_features

    @torch.inference_mode()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """One utterance at a time: the encoder is compute-bound at batch 1 already (1500 frames a GEMM), and a
        single input shape lets a compiled encoder serve every batch size without recompiling."""
        return torch.cat([self.encoder(row[None]) for row in features])

    @torch.inference_mode()
    def generate(self, features: torch.Tensor) -> torch.Tensor:
        """Greedy token ids, prompt included, (batch, length); finished rows are padded with `eos`."""
        encoded = self.encode(features)
        with torch_threads(self.decoder_threads):
            return self._decode(encoded)

    def _decode(self, encoded: torch.Tensor) -> torch.Tensor:
        """Greedy decoding of the whole batch in lockstep by the shared loop (`decoding.greedy_decode`)."""
        state = FastDecoderState(self.decoder, encoded, self.rules.max_length)
        return torch.from_numpy(greedy_decode(state, encoded.shape[0], self.rules))

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        ids = self.generate(self.features(audios))
        return self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
