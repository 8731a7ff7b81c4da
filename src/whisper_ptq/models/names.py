"""Facts about Whisper's architecture that several layers need, defined once: module names in transformers'
`WhisperForConditionalGeneration` and vocabulary sizes. No imports: the command line and the report use them."""

HEAD = "proj_out"  # the LM head, tied to model.decoder.embed_tokens
ENCODER_PREFIX = "model.encoder."
DECODER_PREFIX = "model.decoder."
ENGLISH_ONLY_VOCAB_SIZE = 51864  # multilingual checkpoints have 51865 (51866 for large-v3)
