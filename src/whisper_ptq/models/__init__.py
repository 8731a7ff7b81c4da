"""Whisper models: where a spec points (`sources`, light), loading it as transformers (`loading`), and the
CTranslate2 model.bin reader and converter (`ct2_format`). `names` holds the architecture's shared names."""
