"""The fastest honest CPU path: `whisper_ptq.engines.fast` (int8 GEMMs, lean greedy loop) with the kernels of
the best plan this CPU has the instructions for (`KERNEL_PLANS`), or, as `fast-cpu`, a maintained runtime's
recipe on the CPU classes where that measured faster (`RUNTIME_FOR_CLASS`).

The speed knobs land in `Built.info` (summary.json, results database): engine, CPU class and plan, linear kinds
and counts, LM head, attention, decoder threads.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whisper_ptq.backends.base import Backend, BuildContext, Built, Param
from whisper_ptq.errors import UserError
from whisper_ptq.recipes import OptionValue, Recipe
from whisper_ptq.results.environment import cpu_class, has_class

if TYPE_CHECKING:
    import torch
    from torch import nn


KINDS = ("int8", "fp32")
STATE_FILE = "model.pt"
# The first encoder layer's attention input has outlier channels (LayerNorm output of the conv stem): the one
# place where dynamic int8 costs accuracy (relative encoder-output error 4% for its q/k/v alone, about 1% for
# any other layer), so an int8 encoder keeps it at the plan's `sensitive` precision.
FIRST_ATTENTION = (r"^model\.encoder\.layers\.0\.self_attn\.",)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """The kernels of one CPU class: keys of `engines.fast.LINEAR_KINDS` for the encoder's linears (`keep`
    regexes name those at `sensitive` precision, which the conv stem takes too) and the decoder's, which the LM
    head's int8 pass shares; a key of `engines.fast.ENCODER_ATTENTION`. `why`: what was measured."""

    encoder: str
    attention: str
    decoder: str
    sensitive: str = "fp32"
    keep: tuple[str, ...] = ()
    cross: str = "fp32"  # a key of engines.fast.CROSS_ATTENTION
    why: str = ""


# Chosen by measurement (whisper-base, 2 threads; README "Speed on CPU"), keyed by the CPU class each was made
# for; a CPU runs the first plan whose class it has (`plan_for`). Decoder steps (1-8 rows) run fbgemm's packed
# int8 GEMV on every x86 class: 2-3x faster than `_int_mm` and fp32 there. The AVX-512 VNNI and BF16 classes had
# plans of their own (a `_int_mm` int8 encoder, bf16 attention, compiled by inductor): OpenVINO's int8 recipes
# beat them by 1.13-1.64x, so fast-cpu is OpenVINO there (RUNTIME_FOR_CLASS) and those plans were removed; the
# engine on such a CPU (`fast:`) runs the AVX2 plan.
KERNEL_PLANS: dict[str, KernelPlan] = {
    "amx": KernelPlan(
        encoder="bf16",
        attention="sdpa-bf16",
        decoder="int8-dynamic",
        sensitive="bf16",
        cross="bf16",
        why="AMX: the encoder's 36 linears of whisper-base at 1500 rows take 56-61 ms in bf16, 139-162 ms in "
        "int8 `_int_mm`, 225-258 ms in fp32; bf16 flash attention 12 ms a layer against fp32's 26",
    ),
    "avx2": KernelPlan(
        encoder="int8-dynamic-7bit-rows",
        attention="sdpa",
        decoder="int8-dynamic-7bit",
        keep=FIRST_ATTENTION,
        why="no VNNI: 7-bit fbgemm int8 with one activation scale per frame (forced AVX2 on a Zen 4: the "
        "encoder window 353 ms against 484 ms with fp32 linears, WER 10.38 on test-other, fp32 10.95; the "
        "decoder's steps 1.9-2.3x faster than fp32); on AVX2-only EPYCs 1.36x (Zen 1/2) and 1.79x (Zen 3) "
        "transformers fp32 at batch 1, WER 10.38 natively on the Zen 3",
    ),
    "portable": KernelPlan(
        encoder="fp32",
        attention="sdpa",
        decoder="fp32",
        why="no measured int8 plan (ARM, old x86): the lean loop in fp32, never slower than transformers",
    ),
}
# CPU classes where a maintained runtime's int8 recipe measured faster than the fast engine, and within issue 16's +0.3
# WER of fp32: there `fast-cpu` is that recipe. AVX-512 BF16 without AMX, native on a Zen 4 EPYC (16 test-other
# utterances, 3 repeats, each recipe in its own process): ov-int8-bf16 3.46x transformers fp32 at batch 1 and 3.00x at
# batch 8, the removed avx512-bf16 plan 2.93x and 2.62x; on a second Zen 4, with the cross-attention keys/values passed
# in bf16 (engines/openvino.compile_graphs), ov-int8-bf16 3.12x and 2.90x and ov-int8-bf16-dq128 (its encoder's
# activations quantized in groups of 128, the decoder's not) 3.64x and 3.30x; WER on the 100 test-other utterances
# ov-int8-bf16 10.74, ov-int8-bf16-dq128 10.80, fp32 10.95. AVX-512 VNNI without BF16, forced on the Zen 4
# (ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI; ov-int8's nodes run AVX-512 f32 kernels and VNNI int8, which such CPUs have):
# ov-int8 3.89x fp32 at batch 1 and 3.21x at batch 8, the removed avx512-vnni plan 2.51x and 2.27x; on the second Zen 4
# ov-int8 2.53x and 1.98x, ov-int8-dq128 2.89x and 2.20x; WER on the 100 ov-int8 10.64, ov-int8-dq128 10.90. AVX2,
# native on an AVX2-only EPYC (16 utterances, 3 repeats): the avx2 plan 1.36x fp32 at batch 1 and 1.40x at batch 8,
# ct2-int8 1.35x and 1.20x, ov-int8 1.30x and 1.27x, ort-int8 1.49x and 1.41x (WER 12.63 on the 100: outside +0.3),
# whispercpp-q8_0 0.77x and 0.72x; on an AVX2-only Zen 3 the avx2 plan 1.79x and 1.80x, ct2-int8 1.39x and 1.20x,
# ov-int8 1.32x and 1.49x, ort-int8 1.88x and 2.20x (WER 13.10 on the 100 there), whispercpp-q8_0 0.86x and 0.86x:
# the engine stays fast-cpu there. ov-int8-ptq-encoder-bf16 (int8 activations in the encoder) is faster still on
# AVX-512 BF16 (README), but it is not fast-cpu: it needs calibration audio and its first open took 61 s, against
# fast-cpu's goal of 20.
RUNTIME_FOR_CLASS = {"avx512-vnni": "ov-int8-dq128", "avx512-bf16": "ov-int8-bf16-dq128"}


def fast_cpu_here(recipes: dict[str, Recipe]) -> Recipe:
    """What `fast-cpu` is on this CPU: the fast engine with this CPU's plan, or the runtime's recipe that
    beats it here (RUNTIME_FOR_CLASS), under the name fast-cpu."""
    here = cpu_class()
    if here not in RUNTIME_FOR_CLASS:
        return recipes["fast-cpu"]
    chosen = recipes[RUNTIME_FOR_CLASS[here]]
    return dataclasses.replace(
        chosen,
        name="fast-cpu",
        description=f"{chosen.name} on this {here} CPU, where it beats the fast engine: {chosen.description}",
    )


# The instructions each plan's kernels need to beat fp32, and what happens without them (issue 16: on an
# AVX2-only EPYC the AVX-512 plan's `_int_mm` GEMM ran 853 ms against fp32's 41 ms, fast-cpu 14.8x slower
# than transformers fp32).
PLAN_NEEDS = {
    "amx": "AMX: without it its bf16 GEMMs and attention run up to 15x slower than fp32",
    "avx2": "AVX2 and FMA",
    "portable": "",
}


def plan_for(here: str) -> str:
    """The plan a CPU of class `here` runs: the first in KERNEL_PLANS whose class it has."""
    return next(name for name in KERNEL_PLANS if has_class(here, name))


def plan_of(recipe: Recipe) -> KernelPlan:
    """The recipe's plan; fp32 linears and head throughout for weights=fp32."""
    plan = KERNEL_PLANS[str(recipe.option("cpu"))]
    if recipe.weights == "fp32":
        return KernelPlan("fp32", "sdpa", "fp32", why="nothing quantized")
    return plan


def cpu_shortfall(recipe: Recipe) -> str | None:
    """Why the recipe's plan is slower than fp32 on this CPU: it needs instructions this CPU's class lacks."""
    wanted = str(recipe.option("cpu"))
    here = cpu_class()
    if recipe.weights == "fp32" or has_class(here, wanted):
        return None
    return (
        f"its kernels are those of CPU class {wanted!r} (they need {PLAN_NEEDS[wanted]}) and this CPU is "
        f"{here!r}: use cpu=auto (the fast-cpu default), which picks this CPU's plan"
    )


ATTENTION_INFO = {
    "sdpa": "fp32 SDPA (ATen's CPU flash kernel)",
    "sdpa-bf16": "bf16 SDPA (ATen's CPU flash kernel, AMX tiles)",
}


def kind_chooser(recipe: Recipe) -> Any:
    """A fused linear's kind from its transformers names: the plan's decoder kind in the decoder; in the
    encoder the plan's encoder kind, or its `sensitive` one for linears `keep` names."""
    plan = plan_of(recipe)

    def kind_of(names: Sequence[str]) -> str:
        if names[0].startswith("model.decoder."):
            return plan.decoder
        kept = any(re.search(pattern, name) for pattern in plan.keep for name in names)
        return plan.sensitive if kept else plan.encoder

    return kind_of


def linear_facts(modules: Sequence[nn.Module], lm_head: nn.Module) -> dict[str, Any]:
    """How many fused linears (LM head aside) are int8 / float, and their serialized bits per weight (scales
    included, biases not, as `base.linear_bits_per_weight` counts them)."""
    from whisper_ptq.engines.fast import DynamicInt8Linear, FloatLinear

    head = set(lm_head.modules())
    linears = [m for m in modules if isinstance(m, (DynamicInt8Linear, FloatLinear)) and m not in head]
    weights = sum(m.weight.numel() for m in linears)
    stored = sum(_saved_bytes({k: v for k, v in m.state_dict().items() if k != "bias"}) for m in linears)
    return {
        "int8_linear": sum(isinstance(m, DynamicInt8Linear) for m in linears),
        "float_linear": sum(isinstance(m, FloatLinear) for m in linears),
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
    description = "lean greedy engine, int8 GEMMs with kernels chosen per CPU class, fp32-rescored int8 LM head"
    params = {
        "weights": Param(str, "int8", KINDS, "linear weights: int8 (the CPU class's plan) or fp32 throughout"),
        "cpu": Param(
            str,
            "auto",
            ("auto", *KERNEL_PLANS),
            "kernel plan to run, named after the CPU class it was made for; auto: the best plan this CPU has "
            "the instructions for (decided when the recipe is made, and stored with it)",
        ),
        "head": Param(str, "int8", KINDS, "LM head: int8 shortlist re-scored in fp32, or fp32"),
        "decoder_threads": Param(int, 0, help="intra-op threads of the decoding loop; 0: as many as the encoder"),
    }
    named = {
        "fast-cpu": (
            "fast engine with this CPU's kernel plan: int8 decoder and LM head (fbgemm), encoder in AMX bf16 or "
            '7-bit fbgemm int8; OpenVINO int8 on AVX-512 CPUs without AMX (see `cpu` and README "Speed on CPU")',
            {},
        ),
        "fast-cpu-fp32": (
            "fast engine, nothing quantized: the engine's own speed-up over transformers generate",
            {"weights": "fp32", "head": "fp32"},
        ),
    }

    def slow_here(self, recipe: Recipe, device: str) -> str | None:
        return cpu_shortfall(recipe)

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        weights, head = str(values["weights"]), str(values["head"])
        threads = int(values["decoder_threads"])  # type: ignore[arg-type]
        if threads < 0:
            raise UserError(f"recipe {name!r}: decoder_threads must be 0 or more, got {threads}")
        cpu = plan_for(cpu_class()) if values["cpu"] == "auto" else str(values["cpu"])
        plan = KERNEL_PLANS[cpu]
        if head == "int8" and plan.decoder == "fp32":
            head = "fp32"  # the plan has no int8 kernel for this CPU class
        return Recipe(
            name=name,
            library=self.library,
            scheme="dynamic" if weights == "int8" else "reference",
            weights=weights,
            activations="int8" if weights == "int8" and plan.decoder != "fp32" else None,
            granularity="per-channel" if weights == "int8" else "per-tensor",
            keep=plan.keep if weights == "int8" else (),
            devices=("cpu",),
            options=(
                ("cpu", cpu),
                ("decoder_threads", threads),
                ("head", head),
            ),
            description=description or f"fast engine, {weights} linears ({cpu} plan), {head} head",
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
        plan = plan_of(recipe)
        head = plan.decoder if recipe.option("head") == "int8" else "fp32"
        stem = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[plan.sensitive])
        transcriber = FastTranscriber(
            model,
            bundle.processor,
            kind_chooser(recipe),
            head,
            attention=plan.attention,
            stem=stem,
            decoder_threads=threads or None,
            cross=plan.cross,
        )
        if state is not None:
            transcriber.encoder.load_state_dict(state["encoder"])
            transcriber.decoder.load_state_dict(state["decoder"])
        info: dict[str, Any] = {
            "engine": "whisper_ptq.engines.fast.FastTranscriber (greedy loop, preallocated KV cache)",
            "cpu_class": cpu_class(),
            "kernel_plan": {
                "name": recipe.option("cpu"),
                "encoder": plan.encoder,
                "attention": plan.attention,
                "decoder": plan.decoder,
                "head": head,
                "sensitive": plan.sensitive,
                "why": plan.why,
            },
            "linears": "fused q/k/v; int8: per-channel symmetric weights, fbgemm's dynamic linear, one activation "
            "scale per call (-7bit: 7-bit activations; -rows: one scale per row, rows scaled before the call)",
            **linear_facts(list(transcriber.modules()), lm_head=transcriber.decoder.head),
            "kept": list(plan.keep),
            "lm_head": f"{head} shortlist of {SHORTLIST}, re-scored in fp32" if head != "fp32" else "fp32",
            "attention": f"encoder: {ATTENTION_INFO[plan.attention]}; decoder: fp32 SDPA",
            "encoder_batching": "one utterance per encoder call",
            "decoder_threads": threads or torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's kernels: AVX2, AVX512, ...
            "slow_here": self.slow_here(recipe, "cpu"),
        }
        return Built(transcriber, None, info)

    def save(self, quantized: Built, out_dir: Path) -> None:
        """The engine's own weights (int8 and fp32 buffers, encoder and decoder) through torch.save."""
        import torch

        out_dir.mkdir(parents=True, exist_ok=True)
        transcriber = quantized.transcriber
        state = {"encoder": transcriber.encoder.state_dict(), "decoder": transcriber.decoder.state_dict()}
        torch.save(state, out_dir / STATE_FILE)
