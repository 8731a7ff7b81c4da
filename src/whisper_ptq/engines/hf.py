"""The transformers engine: `WhisperForConditionalGeneration.generate`, quantized in place or not."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from whisper_ptq.data.audio import SAMPLE_RATE

# Whisper's own generate() hands `generation_config` and suppress_tokens to GenerationMixin.generate together
# (transformers' workaround for its PR #48108), which then warns that doing so is deprecated: nothing a caller
# can change, so that one message is dropped wherever a model transcribes (an API user's process included).
_OWN_DEPRECATION = "Passing `generation_config` together with generation-related arguments"
logging.getLogger("transformers.generation.utils").addFilter(
    lambda record: not str(record.msg).startswith(_OWN_DEPRECATION)
)


@dataclass
class HFTranscriber:
    """A transformers `WhisperForConditionalGeneration`, quantized in place or not.

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
        kwargs: dict[str, Any] = {"num_beams": 1, "do_sample": False, "return_timestamps": False}
        if getattr(config, "is_multilingual", False):
            kwargs.update(language="en", task="transcribe")
        self.generate_kwargs = {**kwargs, **self.generate_kwargs}

    def features(self, audios: list[np.ndarray]) -> torch.Tensor:
        extracted = self.processor.feature_extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return extracted.input_features.to(self.device, self.input_dtype)

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        features = self.features(audios)
        autocast = (
            torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            ids = self.model.generate(features, **self.generate_kwargs)
        return self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
