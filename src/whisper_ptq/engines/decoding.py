"""The greedy decoding loop shared by every engine that runs its own encoder and decoder (the fast engine,
ONNX Runtime, OpenVINO), so that these engines differ only in their kernels.

The rules are those of transformers' Whisper `generate` for short-form English transcription without
timestamps (`DecodingRules`): the same prompt, `suppress_tokens` at every step, `begin_suppress_tokens` at
the first generated position, stop at `<|endoftext|>` or at `max_length` tokens, greedy argmax. Decoding is
ragged: an utterance leaves the batch at its `<|endoftext|>`, and the engine drops its rows from its caches.

An engine plugs in as a `StepDecoder`, three calls:
- `encode(features)`: log-mel features (batch, mels, frames), float32 -> encoder states, opaque to the loop
  (the engine may compute the cross-attention keys/values there, once per utterance);
- `start(encoded, max_length)` -> a `DecoderState` for those utterances, whose self-attention cache holds up
  to `max_length` positions;
- `DecoderState.step(tokens, start, suppress)`: `tokens` (active rows, new) int64 at positions `start..` ->
  the next token of each active row (int64, (active rows,)): the argmax of the last new token's logits with
  the ids in `suppress` excluded, the cache updated with the new tokens;
  `DecoderState.keep(rows)`: keep only these active rows (ascending indices into the current rows).

`step` returns the choice rather than the logits so that an engine may choose without computing every
logit in full precision (the fast engine's int8 shortlist head); engines that compute logits use
`greedy_choice`. Runtimes that run the exported graphs of `engines/graphs.py` share `GraphDecoderState`:
they differ only in the function that runs the decoder graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from whisper_ptq.data.audio import SAMPLE_RATE


@dataclass(frozen=True)
class DecodingRules:
    """What transformers' Whisper `generate` does for greedy short-form transcription without timestamps."""

    prompt: tuple[int, ...]
    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    eos: int
    max_length: int

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any) -> DecodingRules:
        return cls.from_configs(model.generation_config, model.config, tokenizer)

    @classmethod
    def from_configs(cls, generation_config: Any, config: Any, tokenizer: Any) -> DecodingRules:
        special = ["<|startoftranscript|>"]
        if getattr(generation_config, "is_multilingual", False):
            special += ["<|en|>", "<|transcribe|>"]
        special.append("<|notimestamps|>")
        return cls(
            prompt=tuple(tokenizer.convert_tokens_to_ids(special)),
            suppress=tuple(generation_config.suppress_tokens or ()),
            begin_suppress=tuple(generation_config.begin_suppress_tokens or ()),
            eos=int(generation_config.eos_token_id),
            max_length=min(int(generation_config.max_length), int(config.max_target_positions)),
        )


class DecoderState(Protocol):
    def step(self, tokens: np.ndarray, start: int, suppress: np.ndarray) -> np.ndarray: ...

    def keep(self, rows: list[int]) -> None: ...


class StepDecoder(Protocol):
    def encode(self, features: np.ndarray) -> Any: ...

    def start(self, encoded: Any, max_length: int) -> DecoderState: ...


def greedy_choice(logits: np.ndarray, suppress: np.ndarray) -> np.ndarray:
    """(rows, vocab) logits -> (rows,) argmax ids, never one in `suppress` (ties: the lowest id, as torch)."""
    logits[:, suppress] = -np.inf
    return logits.argmax(axis=-1).astype(np.int64)


class GraphDecoderState:
    """`DecoderState` over an exported decoder graph (`engines.graphs.DecoderGraph`) run by `run`: feeds (input
    name -> array) -> outputs (logits, then the present keys/values). `cross` holds the encoder graph's
    cross-attention keys/values, (batch, heads, frames, head_dim) each, two per layer."""

    def __init__(self, run: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]], cross: Sequence[np.ndarray]):
        from whisper_ptq.engines.graphs import layer_names

        self.run, self.cross, self.names = run, list(cross), layer_names(len(cross) // 2)
        batch, heads, _, head_dim = cross[0].shape
        self.past = [np.zeros((batch, heads, 0, head_dim), np.float32)] * len(cross)

    def step(self, tokens: np.ndarray, start: int, suppress: np.ndarray) -> np.ndarray:
        layers = zip(self.past[0::2], self.past[1::2], self.cross[0::2], self.cross[1::2], strict=True)
        caches = [cache for layer in layers for cache in layer]
        feeds = {"input_ids": np.ascontiguousarray(tokens), **dict(zip(self.names, caches, strict=True))}
        logits, *self.past = self.run(feeds)
        return greedy_choice(np.array(logits, dtype=np.float32), suppress)  # a copy: runtimes may own the output

    def keep(self, rows: list[int]) -> None:
        self.past = [p[rows] for p in self.past]
        self.cross = [c[rows] for c in self.cross]


def greedy_decode(state: DecoderState, batch: int, rules: DecodingRules) -> np.ndarray:
    """Greedy token ids, prompt included, (batch, length); finished rows are padded with `eos`. The whole batch
    decodes in lockstep; an utterance leaves at its `eos` (`state.keep`), so the steps of the longest one cost
    only its own row, where transformers keeps computing finished rows."""
    prompt = len(rules.prompt)
    suppress_first = np.array(sorted({*rules.suppress, *rules.begin_suppress}), dtype=np.int64)
    suppress = np.array(rules.suppress, dtype=np.int64)
    ids = np.full((batch, rules.max_length), rules.eos, dtype=np.int64)
    ids[:, :prompt] = rules.prompt
    rows = np.arange(batch)  # the batch row of each active row
    token = state.step(ids[:, :prompt], 0, suppress_first)
    position = prompt
    while True:
        ids[rows, position] = token
        going = token != rules.eos
        position += 1
        if not going.any() or position == rules.max_length:
            return ids[:, :position]
        if not going.all():
            state.keep(np.flatnonzero(going).tolist())
            rows, token = rows[going], token[going]
        token = state.step(token[:, None], position - 1, suppress)


def decoder_feeds(decoder: StepDecoder, features: np.ndarray, rules: DecodingRules) -> list[dict[str, np.ndarray]]:
    """The decoder graph's inputs at every step of greedy decoding `features` (a decoder whose states are
    `GraphDecoderState`s): calibration data for static quantization of the decoder graph."""
    state = decoder.start(decoder.encode(features), rules.max_length)
    feeds: list[dict[str, np.ndarray]] = []
    run = state.run
    state.run = lambda step_feeds: (feeds.append(step_feeds), run(step_feeds))[1]
    greedy_decode(state, len(features), rules)
    return feeds


def log_mel(processor: Any, audios: Sequence[np.ndarray]) -> np.ndarray:
    """transformers' Whisper features of a batch, (batch, mels, frames) float32, contiguous."""
    features = processor.feature_extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="np")
    return np.ascontiguousarray(features.input_features, dtype=np.float32)


class StepTranscriber:
    """`Transcriber` over a `StepDecoder`: transformers' feature extraction, `greedy_decode`, the tokenizer.
    `workspace` (a TemporaryDirectory holding the model files, if any) lives as long as the transcriber."""

    def __init__(self, decoder: StepDecoder, processor: Any, rules: DecodingRules, workspace: Any = None):
        self.decoder, self.processor, self.rules, self.workspace = decoder, processor, rules, workspace

    def generate(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        encoded = self.decoder.encode(log_mel(self.processor, audios))
        return greedy_decode(self.decoder.start(encoded, self.rules.max_length), len(audios), self.rules)

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        return self.processor.tokenizer.batch_decode(self.generate(audios), skip_special_tokens=True)
