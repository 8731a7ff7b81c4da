"""Facts about Whisper's architecture that several layers need, defined once: module names in transformers'
`WhisperForConditionalGeneration` and vocabulary sizes. No imports: the command line and the report use them."""

HEAD = "proj_out"  # the LM head, tied to model.decoder.embed_tokens
ENCODER_PREFIX = "model.encoder."
DECODER_PREFIX = "model.decoder."
ENGLISH_ONLY_VOCAB_SIZE = 51864  # multilingual checkpoints have 51865 (51866 for large-v3)


def english_prompt(english_only: bool) -> tuple[str, ...]:
    """The special tokens that start a short-form English transcription without timestamps (what
    `engines.decoding` prompts a clip of 30 s or less with), for load scripts written out in exports."""
    if english_only:
        return ("<|startoftranscript|>", "<|notimestamps|>")
    return ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")


# Whisper's language codes in token order (transformers' tokenization_whisper.LANGUAGES, checked by a test), for
# refusing an unknown --language before the model stack loads. A model has the first 99 or all 100 (large-v3: yue).
LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi "
    "ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd "
    "gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()
