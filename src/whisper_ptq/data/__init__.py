"""Speech data: datasets by spec (`datasets`), their grammar (`specs`), audio decoding (`audio`) and
deterministic modifiers such as noise (`modifiers`)."""

from whisper_ptq.data.audio import SAMPLE_RATE, load_audio
from whisper_ptq.data.datasets import Dataset, Utterance, fetch_dataset, open_dataset, resolve_data_root

__all__ = ["SAMPLE_RATE", "Dataset", "Utterance", "fetch_dataset", "load_audio", "open_dataset", "resolve_data_root"]
