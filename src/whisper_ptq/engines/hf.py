"""The transformers engine: `WhisperForConditionalGeneration.generate`, quantized in place or not."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from whisper_ptq.data.audio import SAMPLE_RATE
from whisper_ptq.engines.decoding import Decoded, Prompt, Search, timestamp_config, transcribe, vocabulary
from whisper_ptq.settings import DecodingOptions

# Whisper's own generate() hands `generation_config` and suppress_tokens to GenerationMixin.generate together
# (transformers' workaround for its PR #48108), which then warns that doing so is deprecated: nothing a caller
# can change, so that one message is dropped wherever a model transcribes (an API user's process included).
_OWN_DEPRECATION = "Passing `generation_config` together with generation-related arguments"
logging.getLogger("transformers.generation.utils").addFilter(
    lambda record: not str(record.msg).startswith(_OWN_DEPRECATION)
)


@dataclass
class HFTranscriber:
    """A transformers `WhisperForConditionalGeneration`, quantized in place or not: a window decoder of
    `engines.decoding`.

    Short-form windows (no timestamps, no earlier text, not sampled, no scores needed) go through Whisper's own
    `generate` with `generate_kwargs`, as before long form existed; the others through the generic
    `GenerationMixin.generate` with the prompt `engines.decoding` built, Whisper's suppressed tokens and
    transformers' `WhisperTimeStampLogitsProcessor` (OpenAI's timestamp rules).

    `autocast` runs generation under CPU/CUDA autocast to that dtype (the bf16 reference uses it for the
    compute while keeping the fp32 weights untouched only when the recipe says so). Generation runs under
    `torch.no_grad()`, not `inference_mode()`: Quanto's int4 kernels fail under inference mode.
    """

    model: Any
    processor: Any
    device: str = "cpu"
    input_dtype: torch.dtype = torch.float32
    autocast: torch.dtype | None = None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        config = self.model.generation_config
        self.multilingual = bool(getattr(config, "is_multilingual", False))
        self.max_target_positions = int(self.model.config.max_target_positions)
        kwargs: dict[str, Any] = {"num_beams": 1, "do_sample": False, "return_timestamps": False}
        if self.multilingual:
            kwargs.update(language="en", task="transcribe")
        self.generate_kwargs = {**kwargs, **self.generate_kwargs}

    def features(self, audios: list[np.ndarray]) -> torch.Tensor:
        """Short-form features (audio padded or cut to 30 s) on the model's device, as calibration feeds them."""
        extracted = self.processor.feature_extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return extracted.input_features.to(self.device, self.input_dtype)

    def _running(self) -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.autocast is not None:
            stack.enter_context(torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast))
        return stack

    def decode(self, features: np.ndarray, prompt: Prompt, search: Search) -> list[Decoded]:
        inputs = torch.from_numpy(features).to(self.device, self.input_dtype)
        if not prompt.timestamps and not prompt.previous and search.temperature == 0 and not search.scores:
            return self._short_form(inputs, prompt, search)
        return self._generic(inputs, prompt, search)

    def _short_form(self, inputs: torch.Tensor, prompt: Prompt, search: Search) -> list[Decoded]:
        kwargs = {**self.generate_kwargs, "num_beams": search.beam_size}
        if self.multilingual:
            kwargs.update(language=prompt.language, task=prompt.task)
        with self._running():
            sequences = self.model.generate(inputs, **kwargs)
        tokens = vocabulary(self).tokens(prompt, self.max_target_positions)
        # Whisper's generate drops the prompt and the end-of-text, and counts max_length in new tokens.
        limit = min(
            int(kwargs.get("max_length", self.model.generation_config.max_length)),
            self.max_target_positions - len(tokens),
        )
        return self._decoded(sequences, tokens, None, search, limit)

    def _generic(self, inputs: torch.Tensor, prompt: Prompt, search: Search) -> list[Decoded]:
        from transformers import GenerationMixin, LogitsProcessorList
        from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

        tokens = vocabulary(self).tokens(prompt, self.max_target_positions)
        config = timestamp_config(self.model.generation_config)
        sampled = search.temperature > 0
        config.update(
            max_length=len(tokens) + (search.max_new_tokens or self.max_target_positions - len(tokens)),
            max_new_tokens=None,
            num_beams=search.beam_size,
            do_sample=sampled,
            temperature=search.temperature if sampled else 1.0,
            top_k=0 if sampled else None,
            return_timestamps=prompt.timestamps,
            forced_decoder_ids=None,
            return_dict_in_generate=True,
            output_scores=search.scores,
        )
        processors = LogitsProcessorList(
            [WhisperTimeStampLogitsProcessor(config, begin_index=len(tokens))] if prompt.timestamps else []
        )
        prompt_ids = torch.tensor([tokens] * len(inputs), device=self.device)
        seeded = torch.random.fork_rng(devices=[]) if sampled else contextlib.nullcontext()
        with self._running(), seeded:
            if sampled:
                torch.manual_seed(search.seed)
            out = GenerationMixin.generate(
                self.model,
                inputs,
                generation_config=config,
                logits_processor=processors,
                decoder_input_ids=prompt_ids,
            )
        return self._decoded(
            out.sequences, tokens, out if search.scores else None, search, config.max_length - len(tokens)
        )

    def _decoded(
        self, sequences: torch.Tensor, prompt: tuple[int, ...], out: Any, search: Search, limit: int
    ) -> list[Decoded]:
        """Rows of generated tokens (`GenerationMixin.generate` returns the prompt too), cut at the end-of-text;
        a row that used all `limit` new tokens without one stopped at the token limit."""
        eos = int(self.model.generation_config.eos_token_id)
        results = []
        for row, ids in enumerate(sequences.tolist()):
            generated = ids[len(prompt) :] if tuple(ids[: len(prompt)]) == prompt else ids
            tokens = tuple(generated[: generated.index(eos)] if eos in generated else generated)
            finished = len(tokens) < limit
            results.append(Decoded(tokens, finished, _logprob(out, row, len(tokens) + finished, search)))
        return results

    def detect_language(self, features: np.ndarray) -> list[int]:
        inputs = torch.from_numpy(features).to(self.device, self.input_dtype)
        with self._running():
            return self.model.detect_language(inputs).view(-1).tolist()

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        return [t.text for t in transcribe(self, audios, DecodingOptions())]


def _logprob(out: Any, row: int, steps: int, search: Search) -> float:
    """Sum of the log-probabilities of a row's `steps` generated tokens under the processed (masked) logits,
    unscaled by the sampling temperature, as OpenAI sums them; a beam's own length-normalized score undone."""
    if out is None:
        return 0.0
    if search.beam_size > 1:
        return float(out.sequences_scores[row]) * steps
    tokens = out.sequences[row, -len(out.scores) :]
    scale = search.temperature if search.temperature > 0 else 1.0
    total = 0.0
    for step in range(steps):
        logprobs = torch.log_softmax(out.scores[step][row].float() * scale, dim=-1)
        total += float(logprobs[tokens[step]])
    return total
