"""The results contract: per-utterance rows, the figures computed from them, the environment they were
measured in, and the SQLite store that keeps them. Nothing here imports torch or a model library, so the
store, the report and the sweep's driver start fast and never load a model."""
