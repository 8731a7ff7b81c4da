"""Audio decoding: any format libsndfile reads, at any rate and channel count, to 16 kHz mono float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from whisper_ptq.errors import UserError

SAMPLE_RATE = 16000


def load_audio(path: Path | str) -> np.ndarray:
    """Decode any format libsndfile reads, at any rate and channel count, to 16 kHz mono float32."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"audio file not found: {path}")
    try:
        frames, rate = sf.read(path, dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise UserError(f"cannot decode audio file {path}: {exc.error_string}") from exc
    if frames.shape[0] == 0:
        raise UserError(f"audio file is empty (0 samples): {path}")
    mono = frames.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)
