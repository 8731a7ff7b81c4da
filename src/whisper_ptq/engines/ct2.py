"""The CTranslate2 engine: a converted Whisper model decoding exactly like transformers' `generate`."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ptq.engines.decoding import Decoded, Prompt, Search, transcribe, vocabulary
from whisper_ptq.settings import DecodingOptions


@dataclass
class CT2Transcriber:
    """A CTranslate2 Whisper model, a window decoder of `engines.decoding` decoding like `HFTranscriber`: the
    same features and prompts, the same suppressed tokens (the converter copies them from the generation config),
    the same length limits, OpenAI's timestamp rules (CTranslate2's C++ copy, on when the prompt does not end
    with `<|notimestamps|>`), greedy or beam search."""

    model_dir: Path
    processor: Any  # the transformers WhisperProcessor: same features and tokenizer as HFTranscriber
    compute_type: str
    device: str = "cpu"
    max_length: int = 448  # transformers' generation_config.max_length
    max_target_positions: int = 448  # the decoder's position limit (model config)
    # Owns the converted files when they live in a temporary directory, so `save` can copy them later.
    workspace: tempfile.TemporaryDirectory | None = None
    model: Any = field(init=False)

    def __post_init__(self) -> None:
        import ctranslate2
        import torch

        kind, _, index = self.device.partition(":")
        self.model = ctranslate2.models.Whisper(
            str(self.model_dir),
            device=kind,
            device_index=int(index or 0),
            compute_type=self.compute_type,
            intra_threads=torch.get_num_threads(),
        )
        self.multilingual = bool(self.model.is_multilingual)

    @classmethod
    def for_bundle(
        cls, model_dir: Path, bundle: Any, compute_type: str, device: str, workspace: Any = None
    ) -> CT2Transcriber:
        return cls(
            model_dir,
            bundle.processor,
            compute_type,
            device,
            bundle.model.generation_config.max_length,
            bundle.model.config.max_target_positions,
            workspace,
        )

    def ct2_max_length(self, prompt_length: int, new_tokens: int | None = None) -> int:
        """CTranslate2's `max_length` L that makes it decode `new_tokens` (default: transformers' short-form
        rule, min(max_length, max_target_positions - prompt)): it decodes min(L / 2, L - prompt + 1) steps
        (OpenAI's sample_len rule), the end-of-text included, as transformers counts them."""
        if new_tokens is None:
            new_tokens = min(self.max_length, self.max_target_positions - prompt_length)
        return 2 * new_tokens if new_tokens >= prompt_length - 1 else new_tokens + prompt_length - 1

    def _features(self, features: np.ndarray) -> Any:
        import ctranslate2

        return ctranslate2.StorageView.from_array(np.ascontiguousarray(features, np.float32))

    def decode(self, features: np.ndarray, prompt: Prompt, search: Search) -> list[Decoded]:
        import ctranslate2

        tokens = list(vocabulary(self).tokens(prompt, self.max_target_positions))
        new_tokens = search.max_new_tokens or min(self.max_length, self.max_target_positions - len(tokens))
        sampled = search.temperature > 0
        if sampled:
            ctranslate2.set_random_seed(search.seed)
        results = self.model.generate(
            self._features(features),
            [tokens] * len(features),
            beam_size=search.beam_size,
            max_length=self.ct2_max_length(len(tokens), new_tokens),
            suppress_blank=True,  # the converter's suppress_ids_begin = transformers' begin_suppress_tokens
            suppress_tokens=[-1],  # the converter's suppress_ids = transformers' suppress_tokens
            return_scores=search.scores,
            sampling_topk=0 if sampled else 1,
            sampling_temperature=search.temperature if sampled else 1.0,
        )
        decoded = []
        for result in results:
            ids = tuple(result.sequences_ids[0])
            # The score is the mean log-probability over the tokens (length_penalty 1): faster-whisper's reading.
            logprob = result.scores[0] * len(ids) if search.scores else 0.0
            decoded.append(Decoded(ids, len(ids) < new_tokens, logprob))
        return decoded

    def detect_language(self, features: np.ndarray) -> list[int]:
        ranked = self.model.detect_language(self._features(features))
        return self.processor.tokenizer.convert_tokens_to_ids([languages[0][0] for languages in ranked])

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        return [t.text for t in transcribe(self, audios, DecodingOptions())]
