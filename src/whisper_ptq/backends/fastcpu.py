"""The fastest honest CPU path: `whisper_ptq.engines.fast` (int8 per-token GEMMs, lean greedy loop), optionally
with the encoder compiled by `torch.compile` (inductor fuses the per-row quantization into its neighbours).

The speed knobs land in `Built.info` (summary.json, results database): engine, linear kinds and counts,
LM head, attention, decoder threads, whether and how long the encoder was compiled.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import Backend, BuildContext, Built, Param
from whisper_ptq.errors import UserError
from whisper_ptq.recipes import OptionValue, Recipe
from whisper_ptq.results.environment import cpu_flags

if TYPE_CHECKING:
    import torch
    from torch import nn

    from whisper_ptq.engines.fast import FastTranscriber

KINDS = ("int8", "fp32")
SENSITIVE = {"bf16": "bfloat16", "fp32": "float32"}  # torch dtype names
STATE_FILE = "model.pt"
ATTENTIONS = ("sdpa", "bf16")  # the keys of engines.fast.ENCODER_ATTENTION
# What `keep` names, as regexes over transformers module names (Recipe.keep). The first encoder layer's
# attention input has outlier channels (LayerNorm output of the conv stem): the one place where per-token int8
# costs accuracy (relative encoder-output error 4% for its q/k/v alone, about 1% for any other layer).
KEEP_CHOICES = {
    None: (),
    "encoder-first-attention": (r"^model\.encoder\.layers\.0\.self_attn\.",),
    "encoder-first-layer": (r"^model\.encoder\.layers\.0\.",),
}


def cpu_shortfalls(recipe: Recipe) -> list[tuple[set[str], str]]:
    """The instructions (any of these /proc/cpuinfo flags) the recipe's kernels need to beat fp32, and what
    happens without them. Measured with one GEMM of whisper-base's MLP (1500x512 by 512x2048, 2 threads) on an
    AVX2-only AMD EPYC: fp32 41 ms, bf16 219 ms, torch._int_mm int8 853 ms; fast-cpu there ran 14.8x slower
    than transformers fp32 (issue 16)."""
    shortfalls = []
    if recipe.weights == "int8":
        shortfalls.append(
            (
                {"avx512_vnni", "avx_vnni", "amx_int8"},
                "no VNNI int8 instructions on this CPU: its int8 GEMMs run "
                "up to 20x slower than fp32 here (fast-cpu-fp32, ct2-int8 or ort-int8 are faster on such CPUs)",
            )
        )
    if recipe.option("attention") == "bf16":
        shortfalls.append(
            (
                {"avx512_bf16", "amx_bf16"},
                "no native bf16 on this CPU: the bf16 encoder attention runs about 5x "
                "slower than fp32 here (attention=sdpa avoids it)",
            )
        )
    return shortfalls


def attention_info(attention: str) -> str:
    from whisper_ptq.engines.fast import ATTENTION_BLOCK

    if attention == "sdpa":
        return "encoder: fp32 SDPA (ATen CPU flash kernel); decoder: fp32 SDPA"
    return f"encoder: bf16 GEMMs over blocks of {ATTENTION_BLOCK} queries, fp32 softmax; decoder: fp32 SDPA"


def kind_chooser(recipe: Recipe) -> Any:
    """Int8 for a fused linear only when the recipe selects every part of it (`keep` wins), else the
    recipe's `sensitive` precision (fp32 throughout for weights=fp32)."""
    if recipe.weights == "fp32":
        return lambda names: "fp32"
    precise = str(recipe.option("sensitive"))
    return lambda names: "int8" if all(recipe.selects(name) for name in names) else precise


def compile_encoder(transcriber: FastTranscriber, frames: int, mels: int) -> float:
    """Compile the encoder for its only input shape (one utterance, 30 s) and run it once; returns seconds.
    Compiling here, in `quantize`, keeps the compile out of every timed region."""
    import torch

    start = time.perf_counter()
    compiled = torch.compile(transcriber.encoder, dynamic=False)
    with torch.inference_mode():
        compiled(torch.zeros(1, mels, frames))
    transcriber.encoder = compiled
    return time.perf_counter() - start


def linear_facts(modules: Sequence[nn.Module]) -> dict[str, Any]:
    """How many fused linears are int8 / fp32, and their serialized bits per weight (scales included, biases
    not, as `base.linear_bits_per_weight` counts them)."""
    from whisper_ptq.engines.fast import FloatLinear, Int8Linear

    linears = [m for m in modules if isinstance(m, (Int8Linear, FloatLinear))]
    weights = sum(m.weight.numel() for m in linears)
    stored = sum(_saved_bytes({k: v for k, v in m.state_dict().items() if k != "bias"}) for m in linears)
    return {
        "int8_linear": sum(isinstance(m, Int8Linear) for m in linears),
        "fp32_linear": sum(isinstance(m, FloatLinear) for m in linears),
        "linear_bits_per_weight": 8 * stored / weights,
    }


def _saved_bytes(state: dict[str, torch.Tensor]) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


class FastCPUBackend(Backend):
    library = "fast"
    beam_search = False  # a step-wise engine: `engines.decoding.StepDecoding` searches greedily
    description = "lean greedy engine: fused int8 per-token GEMMs (oneDNN VNNI), fp32-rescored int8 LM head"
    params = {
        "weights": Param(str, "int8", KINDS, "linear weights: int8 (per-token int8 activations) or fp32"),
        "head": Param(str, "int8", KINDS, "LM head: int8 shortlist re-scored in fp32, or fp32"),
        "keep": Param(str, None, tuple(KEEP_CHOICES), "linears not quantized (the sensitive first encoder layer)"),
        "sensitive": Param(str, "fp32", tuple(SENSITIVE), "precision of the kept linears and the conv stem"),
        "attention": Param(str, "bf16", ATTENTIONS, "encoder attention: bf16 blocked GEMMs, or fp32 SDPA (flash)"),
        "compile": Param(bool, True, help="torch.compile the encoder (compiled once, in quantize)"),
        "decoder_threads": Param(int, 0, help="intra-op threads of the decoding loop; 0: as many as the encoder"),
    }
    named = {
        "fast-cpu": (
            "fast engine: int8 per-token linears (first encoder attention and conv stem bf16), bf16 blocked "
            "encoder attention, int8+fp32 LM head, compiled encoder",
            {"keep": "encoder-first-attention", "sensitive": "bf16"},
        ),
        "fast-cpu-int8": (
            "fast engine with every linear int8 (no layer kept fp32)",
            {},
        ),
        "fast-cpu-fp32": (
            "fast engine, nothing quantized: the engine's own speed-up over transformers generate",
            {"weights": "fp32", "head": "fp32", "attention": "sdpa", "compile": "false"},
        ),
    }

    def slow_here(self, recipe: Recipe, device: str) -> str | None:
        missing = [why for needs, why in cpu_shortfalls(recipe) if not needs & set(cpu_flags())]
        return "; ".join(missing) or None

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        weights, head, keep = str(values["weights"]), str(values["head"]), values["keep"]
        threads = int(values["decoder_threads"])  # type: ignore[arg-type]
        if threads < 0:
            raise UserError(f"recipe {name!r}: decoder_threads must be 0 or more, got {threads}")
        if weights == "fp32" and (keep or values["sensitive"] != "fp32"):
            raise UserError(f"recipe {name!r}: keep and sensitive apply to weights=int8 only")
        return Recipe(
            name=name,
            library=self.library,
            scheme="dynamic" if weights == "int8" else "reference",
            weights=weights,
            activations="int8" if weights == "int8" else None,
            granularity="per-token" if weights == "int8" else "per-tensor",
            keep=KEEP_CHOICES[keep],
            devices=("cpu",),
            options=(
                ("attention", str(values["attention"])),
                ("compile", bool(values["compile"])),
                ("decoder_threads", threads),
                ("head", head),
                ("keep", keep),
                ("sensitive", str(values["sensitive"])),
            ),
            description=description or f"fast engine, {weights} linears, {head} head",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        return self._built(bundle, recipe)

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        """The engine rebuilt over the export's architecture, its saved buffers restored before compiling."""
        import torch

        path = saved_dir / STATE_FILE
        if not path.is_file():
            raise UserError(f"{saved_dir} holds no fast-engine model ({STATE_FILE} is missing)")
        state = torch.load(path, weights_only=True)
        return self._built(bundle, recipe, state)

    def _built(self, bundle: Any, recipe: Recipe, state: dict[str, Any] | None = None) -> Built:
        import torch

        from whisper_ptq.engines.fast import SHORTLIST, FastTranscriber

        model = bundle.model.eval()
        threads = int(recipe.option("decoder_threads"))  # type: ignore[arg-type]
        head = str(recipe.option("head"))
        attention, stem = str(recipe.option("attention")), getattr(torch, SENSITIVE[str(recipe.option("sensitive"))])
        transcriber = FastTranscriber(
            model,
            bundle.processor,
            kind_chooser(recipe),
            head,
            attention=attention,
            stem=stem,
            decoder_threads=threads or None,
        )
        if state is not None:
            transcriber.encoder.load_state_dict(state["encoder"])
            transcriber.decoder.load_state_dict(state["decoder"])
        info: dict[str, Any] = {
            "engine": "whisper_ptq.engines.fast.FastTranscriber (greedy loop, preallocated KV cache)",
            "linears": "fused q/k/v; int8: per-channel symmetric weights, per-token symmetric activations, "
            "torch._int_mm",
            **linear_facts(list(transcriber.modules())),
            "kept": list(recipe.keep),
            "kept_and_stem_dtype": str(recipe.option("sensitive")),
            "lm_head": f"int8 weight-only shortlist of {SHORTLIST}, re-scored in fp32" if head == "int8" else "fp32",
            "attention": attention_info(attention),
            "encoder_batching": "one utterance per encoder call",
            "decoder_threads": threads or torch.get_num_threads(),
            "compiled": bool(recipe.option("compile")),
            "compile_seconds": None,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's kernels: AVX2, AVX512, ...
            "slow_here": self.slow_here(recipe, "cpu"),
        }
        if recipe.option("compile"):
            config = model.config
            frames = 2 * config.max_source_positions  # conv2 has stride 2
            info["compile_seconds"] = compile_encoder(transcriber, frames, config.num_mel_bins)
        return Built(transcriber, None, info)

    def save(self, quantized: Built, out_dir: Path) -> None:
        """The engine's own weights (int8 and fp32 buffers, encoder and decoder) through torch.save."""
        import torch

        out_dir.mkdir(parents=True, exist_ok=True)
        transcriber = quantized.transcriber
        encoder = getattr(transcriber.encoder, "_orig_mod", transcriber.encoder)
        state = {"encoder": encoder.state_dict(), "decoder": transcriber.decoder.state_dict()}
        torch.save(state, out_dir / STATE_FILE)
