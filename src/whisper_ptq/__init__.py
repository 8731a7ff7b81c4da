"""whisper-ptq: post-training quantization studies of OpenAI Whisper."""

__version__ = "0.1.0"
