"""The CTranslate2 engine: a converted Whisper model decoding exactly like transformers' `generate`."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ptq.data.audio import SAMPLE_RATE

PROMPT_MULTILINGUAL = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
PROMPT_ENGLISH_ONLY = ("<|startoftranscript|>", "<|notimestamps|>")


@dataclass
class CT2Transcriber:
    """A CTranslate2 Whisper model decoding exactly like `HFTranscriber` (greedy, English, no timestamps)."""

    model_dir: Path
    processor: Any  # the transformers WhisperProcessor: same features and tokenizer as HFTranscriber
    compute_type: str
    device: str = "cpu"
    max_length: int = 448  # transformers' generation_config.max_length
    max_target_positions: int = 448  # the decoder's position limit (model config)
    # Owns the converted files when they live in a temporary directory, so `save` can copy them later.
    workspace: tempfile.TemporaryDirectory | None = None
    model: Any = field(init=False)
    prompt: list[int] = field(init=False)

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
        tokens = PROMPT_MULTILINGUAL if self.model.is_multilingual else PROMPT_ENGLISH_ONLY
        self.prompt = self.processor.tokenizer.convert_tokens_to_ids(list(tokens))

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

    def ct2_max_length(self) -> int:
        # transformers' Whisper generates min(max_length, max_target_positions - prompt) new tokens
        # (`_set_max_new_tokens_and_length`); CTranslate2 decodes min(L / 2, L - prompt + 1) steps of its
        # max_length L (OpenAI's sample_len rule): twice that budget stops it where transformers stops.
        return 2 * min(self.max_length, self.max_target_positions - len(self.prompt))

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        import ctranslate2

        features = self.processor.feature_extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="np")
        batch = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.input_features, np.float32))
        results = self.model.generate(
            batch,
            [self.prompt] * len(audios),
            beam_size=1,
            max_length=self.ct2_max_length(),
            suppress_blank=True,  # the converter's suppress_ids_begin = transformers' begin_suppress_tokens
            suppress_tokens=[-1],  # the converter's suppress_ids = transformers' suppress_tokens
            return_scores=False,
        )
        return self.processor.tokenizer.batch_decode([r.sequences_ids[0] for r in results], skip_special_tokens=True)
