"""Whisper as two exportable graphs, for the runtimes that compile a model of their own (ONNX Runtime, OpenVINO).

- `EncoderGraph`: log-mel features (batch, mels, frames) -> the cross-attention keys and values of every
  decoder layer (batch, heads, 1500, head_dim), computed once per utterance.
- `DecoderGraph`: new tokens (batch, new) and, per layer, the self-attention keys/values of the past
  positions and the cross-attention keys/values -> the logits of the last new token (batch, vocab) and the
  self-attention keys/values of past and new positions. An empty past (length 0) is the prompt step.

Both run the transformers model's own modules (its nn.Linear, LayerNorm and Conv1d, unchanged). Attention is
written out as MatMul + Softmax (no fused kernel) so that every runtime's quantizer sees the same plain ops: a
MatMul with a constant weight is a linear, one over two activations is attention. The LM head is the tied
token embedding. Numerically these are transformers' forward passes, in fp32.

`GraphDecoding` is how a runtime decodes with them: the `engines.decoding.StepModel` over a function that runs
the encoder graph and one that runs the decoder graph, so ONNX Runtime and OpenVINO get the shared search (short
and long form, languages, fallback) and differ only in the runtime that runs the graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from whisper_ptq.engines.decoding import Logits, Prompt, Search, StepDecoding, StepRules, keep_rows, log_mel


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, length, width) -> (batch, heads, length, head_dim)"""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length, head_dim) -> (batch, length, width)"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, mask: torch.Tensor | None = None):
    scores = torch.matmul(q * scaling, k.transpose(-1, -2))
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class EncoderGraph(nn.Module):
    def __init__(self, model: Any):
        super().__init__()
        self.model = model.model  # WhisperModel: parameter names stay `model.encoder...`, `model.decoder...`
        self.heads = model.config.encoder_attention_heads
        self.decoder_heads = model.config.decoder_attention_heads

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoder = self.model.encoder
        x = F.gelu(encoder.conv2(F.gelu(encoder.conv1(input_features))))
        x = x.transpose(1, 2) + encoder.embed_positions.weight
        for layer in encoder.layers:
            attn, h = layer.self_attn, layer.self_attn_layer_norm(x)
            q, k, v = (_heads(p(h), self.heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            x = x + attn.out_proj(_merge(_attend(q, k, v, attn.scaling)))
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        x = encoder.layer_norm(x)
        cross: list[torch.Tensor] = []
        for layer in self.model.decoder.layers:
            attn = layer.encoder_attn
            cross += [_heads(attn.k_proj(x), self.decoder_heads), _heads(attn.v_proj(x), self.decoder_heads)]
        return tuple(cross)


class DecoderGraph(nn.Module):
    def __init__(self, model: Any):
        super().__init__()
        self.model = model.model
        self.heads = model.config.decoder_attention_heads

    def forward(self, input_ids: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """caches: per layer (past key, past value, cross key, cross value)."""
        decoder = self.model.decoder
        past, new = caches[0].shape[2], input_ids.shape[1]
        x = decoder.embed_tokens(input_ids) + decoder.embed_positions.weight[past : past + new]
        # Causal within the new tokens; every past position is visible.
        query_positions = torch.arange(new).unsqueeze(1) + past
        key_positions = torch.arange(past + new).unsqueeze(0)
        mask = torch.where(key_positions > query_positions, float("-inf"), 0.0)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(decoder.layers):
            past_k, past_v, cross_k, cross_v = caches[4 * i : 4 * i + 4]
            attn, h = layer.self_attn, layer.self_attn_layer_norm(x)
            q, k, v = (_heads(p(h), self.heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            present += [k, v]
            x = x + attn.out_proj(_merge(_attend(q, k, v, attn.scaling, mask)))
            cross, h = layer.encoder_attn, layer.encoder_attn_layer_norm(x)
            q = _heads(cross.q_proj(h), self.heads)
            x = x + cross.out_proj(_merge(_attend(q, cross_k, cross_v, cross.scaling)))
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        hidden = decoder.layer_norm(x[:, -1])
        # F.linear of a 2-D input exports as Gemm(transB=1) over the embedding itself: the tied head is stored once.
        return (F.linear(hidden, decoder.embed_tokens.weight), *present)


def layer_names(layers: int) -> list[str]:
    """Input names of the decoder graph's caches, in `DecoderGraph.forward`'s order."""
    return [f"{kind}_{i}" for i in range(layers) for kind in ("past_key", "past_value", "cross_key", "cross_value")]


def present_names(layers: int) -> list[str]:
    return [f"{kind}_{i}" for i in range(layers) for kind in ("present_key", "present_value")]


def cross_names(layers: int) -> list[str]:
    return [f"{kind}_{i}" for i in range(layers) for kind in ("cross_key", "cross_value")]


def exportable_graphs(model: Any) -> list[tuple[nn.Module, tuple, list[str], list[str]]]:
    """(graph, example inputs, input names, output names) of the encoder, then the decoder: what every
    runtime's converter is given, so the ONNX and OpenVINO graphs have the same inputs and outputs."""
    layers = model.config.decoder_layers
    features, decoder_inputs = example_inputs(model)
    return [
        (EncoderGraph(model).eval(), (features,), ["input_features"], cross_names(layers)),
        (
            DecoderGraph(model).eval(),
            decoder_inputs,
            ["input_ids", *layer_names(layers)],
            ["logits", *present_names(layers)],
        ),
    ]


def example_inputs(model: Any, batch: int = 2, past: int = 3, new: int = 2) -> tuple[torch.Tensor, tuple]:
    """Example inputs of both graphs (encoder features; decoder tokens and caches), for tracing exporters."""
    config = model.config
    features = torch.zeros(batch, config.num_mel_bins, 2 * config.max_source_positions)
    heads = config.decoder_attention_heads
    head_dim = config.d_model // heads
    caches = []
    for _ in range(config.decoder_layers):
        caches += [torch.zeros(batch, heads, past, head_dim)] * 2
        caches += [torch.zeros(batch, heads, config.max_source_positions, head_dim)] * 2
    return features, (torch.zeros(batch, new, dtype=torch.long), *caches)


# --------------------------------------------------------------------------------------------- decoding


@dataclass
class GraphState:
    """The decoder graph's caches of the rows still decoding: per layer, past self-attention keys and values,
    and the encoder's cross-attention keys and values, each (rows, heads, length, head_dim)."""

    past: list[np.ndarray]
    cross: list[np.ndarray]


class GraphDecoding(StepDecoding):
    """`StepModel` over the two graphs as a runtime runs them: `run_encoder(features)` -> the cross-attention
    keys/values (`cross_names` order), `run_decoder(feeds)` (input name -> array) -> the logits, then the present
    keys/values. `workspace` (a TemporaryDirectory holding the graphs, if any) lives as long as the engine."""

    def __init__(
        self,
        run_encoder: Callable[[np.ndarray], Sequence[np.ndarray]],
        run_decoder: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]],
        model: Any,
        processor: Any,
        workspace: Any = None,
    ):
        self.run_encoder, self.run_decoder, self.processor, self.workspace = (
            run_encoder,
            run_decoder,
            processor,
            workspace,
        )
        self.multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
        self.max_target_positions = int(model.config.max_target_positions)
        self.rules = StepRules.from_model(model)
        self.generation_config = model.generation_config
        self.names = layer_names(model.config.decoder_layers)

    def encode(self, features: torch.Tensor) -> list[np.ndarray]:
        return list(self.run_encoder(np.ascontiguousarray(features.numpy(), dtype=np.float32)))

    def start(self, encoded: list[np.ndarray], prompt: torch.Tensor, max_length: int) -> tuple[Logits, GraphState]:
        batch, heads, _, head_dim = encoded[0].shape
        state = GraphState([np.zeros((batch, heads, 0, head_dim), np.float32)] * len(encoded), list(encoded))
        return self.step(prompt, 0, state), state

    def step(self, tokens: torch.Tensor, position: int, state: GraphState) -> Logits:
        """`position` is implied by the past keys' length."""
        layers = zip(state.past[0::2], state.past[1::2], state.cross[0::2], state.cross[1::2], strict=True)
        caches = [cache for layer in layers for cache in layer]
        feeds = {"input_ids": np.ascontiguousarray(tokens.numpy(), dtype=np.int64)}
        logits, *state.past = self.run_decoder({**feeds, **dict(zip(self.names, caches, strict=True))})
        return Logits(torch.from_numpy(np.array(logits, dtype=np.float32)))  # a copy: runtimes may own the output

    def keep(self, state: GraphState, rows: list[int]) -> GraphState:
        """In place (`keep_rows`): a copy of the cross-attention caches, at every row that finishes, took 1.7 s
        of 7.4 in ov-int8's batches of 8 (16 utterances, whisper-base). The state owns its arrays: the encoder's
        outputs are this decoding's, the past a step's copied outputs."""
        past_length = len(state.past)
        kept = keep_rows([*state.past, *state.cross], rows)
        return GraphState(kept[:past_length], kept[past_length:])

    def calibration_feeds(
        self, audio: np.ndarray, decode: bool = True
    ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        """Static-quantization data from one calibration clip (30 s or less): the encoder graph's input, and (if
        `decode`) the decoder graph's inputs at every step of decoding it greedily in short form."""
        features = log_mel(self.processor, [audio])
        steps: list[dict[str, np.ndarray]] = []
        if not decode:
            return {"input_features": features}, steps
        run = self.run_decoder
        self.run_decoder = lambda feeds: (steps.append(feeds), run(feeds))[1]
        try:
            language = "en" if self.multilingual else None
            self.decode(features, Prompt(language, "transcribe", timestamps=False), Search())
        finally:
            self.run_decoder = run
        return {"input_features": features}, steps
