"""whisper-ptq: post-training quantization studies of OpenAI Whisper."""

import logging

__version__ = "0.1.0"

# Imported transitively by transformers, torchao logs at import time that its CUDA-only extensions are
# missing, and torch warns about torchao's enum registration: noise on every CPU run, not a user problem.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
