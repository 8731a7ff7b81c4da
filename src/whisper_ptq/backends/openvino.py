"""OpenVINO: Whisper converted to OpenVINO IR from the loaded transformers model (`openvino.convert_model`),
compressed or quantized by NNCF as OpenVINO's own Whisper notebooks do, run by the CPU plugin
(`engines/openvino.py`; the shared greedy loop).

- `mode=int8` / `int4`: `nncf.compress_weights`, weight-only: int8 (asymmetric unless `symmetric`), or int4
  (sym/asym) in groups of `group_size` for a `ratio` of the linears, the rest, the embedding and the last
  layer in int8 (NNCF's backup precision). `awq`, `scale_estimation` and `gptq` are NNCF's data-aware int4
  options, calibrated on the calibration split (the decoder's inputs at every step of greedy decoding).
- `mode=ptq`: `nncf.quantize`, full int8 (weights and activations, FakeQuantize) with
  `model_type=TRANSFORMER` and SmoothQuant; the notebooks' alphas (encoder 0.80, decoder 0.96) are the default.
- `mode=ptq-encoder`: the encoder so, calibrated on the calibration clips' features only, the decoder int8
  weight-only. Measured on whisper-base, 100 test-other utterances, Zen 4, bf16 compute: WER 10.64 against
  fp32's 10.95 (full int8, `ptq`: 11.64), and 3.22x transformers fp32 at batch 1 against ov-int8-bf16's 2.95x:
  the encoder is two thirds of ov-int8-bf16's time, and its int8 GEMMs run on VNNI.
- `mode=none`: the converted IR, fp32.
The CPU plugin computes in `precision` (f32; bf16 is its default on CPUs with AVX-512 BF16 or AMX). Where it has
the kernels, the plugin also quantizes the inputs of weight-compressed linears to int8 at run time and multiplies
in int8 ("dynamic quantization", in groups of 32 values by default): `dynamic_quant_encoder` and
`dynamic_quant_decoder` set each graph's group (0: off). On a Zen 4 in bf16 the encoder was fastest in groups of
128-256 (a 30 s window 264 ms, against 303 at 32 and 334 off) and the decoder with it off (a step 7.8 ms, 9.8 at
32): a decoder step is a single row, which gains nothing from int8 and pays the quantization. `ov-int8-dq128` and
`ov-int8-bf16-dq128` are so (128 and 0): WER 10.90 and 10.80 on the 100 test-other utterances against ov-int8's
10.64 and fp32's 10.95. OpenVINO cannot select modules.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from whisper_ptq.backends.base import Backend, BuildContext, Built, Loader, Param, graph_loader
from whisper_ptq.errors import UserError
from whisper_ptq.recipes import OptionValue, Recipe
from whisper_ptq.results.environment import cpu_class, has_class, has_vnni

MODES = ("none", "int8", "int4", "ptq", "ptq-encoder")
PARTS = ("encoder", "decoder")
STATIC = ("ptq", "ptq-encoder")
CALIBRATED_OPTIONS = ("awq", "scale_estimation", "gptq")
NNCF_NUMPY_LOWERING = "NNCF_DISABLE_OPTIMIZED_COMPRESSION"  # read by nncf at each weight (weight_lowering.py)


# How the export's load script opens the two graphs with the runtime's own API (`base.graph_loader`).
OPENVINO_SESSIONS = """\
properties = <properties>
core = openvino.Core()
graphs = {part: core.read_model(f"{export}/{part}.xml") for part in ("encoder", "decoder")}
cross_ports = [port.get_any_name() for port in graphs["encoder"].outputs]
# Computing in bf16 on a CPU with native BF16, the cross-attention keys/values pass between the graphs in bf16
# (uint16 arrays of the bits): converting them at every decoder step made a step 22% slower.
bf16 = properties["decoder"]["INFERENCE_PRECISION_HINT"] == "bf16"
bf16 &= "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
for part, side in (("encoder", "output"), ("decoder", "input")) if bf16 else ():
    ports = PrePostProcessor(graphs[part])
    for name in cross_ports:
        getattr(ports, side)(name).tensor().set_element_type(openvino.Type.bf16)
    graphs[part] = ports.build()
encoder, decoder = (core.compile_model(graphs[part], "CPU", properties[part]) for part in ("encoder", "decoder"))


def encode(feeds):
    return [out.view(np.uint16) if bf16 else out for out in encoder(feeds, share_inputs=True).values()]


def decode(feeds):
    if bf16:
        feeds |= {k: openvino.Tensor(feeds[k], list(feeds[k].shape), openvino.Type.bf16) for k in cross_ports}
    return list(decoder(feeds, share_inputs=True).values())
"""


class OpenVINOBackend(Backend):
    library = "openvino"
    description = "OpenVINO IR converted from the model, NNCF weight compression (int8/int4) and int8 PTQ"
    requires = {"openvino": "openvino", "nncf": "nncf"}
    beam_search = False  # a step-wise engine: `engines.decoding.StepDecoding` searches greedily
    reuse_builds = True  # tracing the graphs is most of the open (backends/reuse.py)
    # compile options: ov-int8, ov-int8-bf16 and their -dq128 save the same IR
    load_options = ("precision", "dynamic_quant_encoder", "dynamic_quant_decoder")
    params = {
        "mode": Param(
            str,
            "int8",
            MODES,
            "none (fp32), int8 / int4 weight compression, ptq (full int8), or ptq-encoder (full int8 "
            "encoder, int8 weight-only decoder)",
        ),
        "symmetric": Param(bool, False, help="int8/int4 weights without zero points"),
        "group_size": Param(int, 128, help="int4: weights per scale (-1: per output channel)"),
        "ratio": Param(float, 1.0, help="int4: share of the linears in int4, the rest int8"),
        "awq": Param(bool, False, help="int4: activation-aware weight scaling (calibrated)"),
        "scale_estimation": Param(bool, False, help="int4: scales fitted to the calibration activations"),
        "gptq": Param(bool, False, help="int4: GPTQ error compensation (calibrated)"),
        "smooth_quant_encoder": Param(float, 0.80, help="ptq: SmoothQuant alpha of the encoder (-1: off)"),
        "smooth_quant_decoder": Param(float, 0.96, help="ptq: SmoothQuant alpha of the decoder (-1: off)"),
        "precision": Param(str, "f32", ("f32", "bf16"), "the CPU plugin's inference precision"),
        **{
            f"dynamic_quant_{part}": Param(
                int,
                32,
                help=f"{part}'s int8/int4 weight-only linears: the CPU plugin quantizes their inputs to int8 at "
                "run time in groups of this many values and multiplies in int8 (0: off; 32 is the plugin's default)",
            )
            for part in PARTS
        },
    }
    named = {
        "ov-fp32": ("OpenVINO fp32: the converted IR, unquantized", {"mode": "none"}),
        "ov-int8": ("OpenVINO int8 weight-only (NNCF compress_weights, asymmetric, per channel)", {}),
        "ov-int8-bf16": (
            "OpenVINO int8 weight-only, computing in bf16 (the CPU plugin's default on AVX-512 BF16 and AMX)",
            {"precision": "bf16"},
        ),
        **{
            f"ov-int8{suffix}-dq128": (
                f"OpenVINO int8 weight-only{computing}, dynamic quantization set as fastest measured on AVX-512 "
                "(module docstring)",
                {**options, "dynamic_quant_encoder": "128", "dynamic_quant_decoder": "0"},
            )
            for suffix, computing, options in (("", "", {}), ("-bf16", ", computing in bf16", {"precision": "bf16"}))
        },
        "ov-int4": (
            "OpenVINO int4 weight-only (NNCF, asymmetric, groups of 128; embedding and last layer int8)",
            {"mode": "int4"},
        ),
        "ov-int4-awq": (
            "OpenVINO int4 weight-only with AWQ and scale estimation, calibrated",
            {"mode": "int4", "awq": "true", "scale_estimation": "true"},
        ),
        "ov-int8-ptq": (
            "OpenVINO full int8 (NNCF quantize, transformer model type, SmoothQuant 0.80/0.96), calibrated",
            {"mode": "ptq"},
        ),
        "ov-int8-ptq-encoder-bf16": (
            "OpenVINO: full int8 encoder (NNCF quantize, SmoothQuant 0.80, calibrated), int8 weight-only decoder, "
            "computing in bf16",
            {"mode": "ptq-encoder", "precision": "bf16"},
        ),
    }

    def slow_here(self, recipe: Recipe, device: str) -> str | None:
        here = cpu_class()
        if recipe.option("precision") != "bf16" or has_class(here, "avx512-bf16"):
            return None
        # The plugin counts AVX-512 as bf16 support (utils/precision_support.cpp) and emulates it there, which its
        # docs call much slower than f32; without AVX-512 it computes in f32.
        return (
            f"precision=bf16 on this {here} CPU, which has no native BF16: the CPU plugin emulates bf16 (AVX-512) or "
            "computes in f32; the same recipe with precision=f32 is the one to run here"
        )

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        mode, group = str(values["mode"]), int(values["group_size"])  # type: ignore[arg-type]
        ratio = float(values["ratio"])  # type: ignore[arg-type]
        by_mode = {
            "int4": ("group_size", "ratio", *CALIBRATED_OPTIONS),
            "ptq": ("smooth_quant_encoder", "smooth_quant_decoder"),
            "ptq-encoder": ("smooth_quant_encoder",),
        }
        weight_options = {"symmetric", "dynamic_quant_encoder", "dynamic_quant_decoder"} if mode != "none" else set()
        applies = {"precision", *weight_options, *by_mode.get(mode, ())}
        stray = [k for k in self.params if k != "mode" and k not in applies and values[k] != self.params[k].default]
        if stray:
            raise UserError(f"recipe {name!r}: {stray[0]} does not apply to mode={mode}")
        if mode == "int4" and not (group == -1 or group > 0):
            raise UserError(f"recipe {name!r}: group_size must be positive or -1, got {group}")
        if not 0.0 < ratio <= 1.0:
            raise UserError(f"recipe {name!r}: ratio must be in (0, 1], got {ratio}")
        negative = [f"dynamic_quant_{part}" for part in PARTS if int(values[f"dynamic_quant_{part}"]) < 0]  # type: ignore[arg-type]
        if negative:
            raise UserError(
                f"recipe {name!r}: {negative[0]} must be 0 (off) or a group size, got {values[negative[0]]}"
            )
        calibrated = mode in STATIC or (mode == "int4" and any(values[k] for k in CALIBRATED_OPTIONS))
        return Recipe(
            name=name,
            library=self.library,
            # "static": calibrated on the calibration split (preflight provides it)
            scheme="reference" if mode == "none" else "static" if calibrated else "weight-only",
            weights={"none": "fp32", "int4": "int4"}.get(mode, "int8"),
            activations="int8" if mode in STATIC else None,
            granularity="per-group" if mode == "int4" and group > 0 else "per-channel",
            group_size=group if mode == "int4" and group > 0 else None,
            symmetric=bool(values["symmetric"]) or mode in STATIC,
            devices=("cpu",),
            options=tuple(sorted((key, values[key]) for key in self.params)),
            description=(description or f"OpenVINO {mode}") + run_time_note(mode, values),
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        import torch

        from whisper_ptq.engines.openvino import convert_openvino, openvino_engine, save_openvino

        if recipe.modules or recipe.keep:
            raise UserError(f"recipe {recipe.name!r}: OpenVINO quantizes every linear, it cannot select modules")
        threads = torch.get_num_threads()
        encoder, decoder = convert_openvino(bundle.model)
        if recipe.option("mode") != "none":
            calibration = None
            if recipe.needs_calibration:
                if ctx.calibration is None:
                    raise UserError(f"recipe {recipe.name!r} needs calibration audio")
                fp32 = openvino_engine(encoder, decoder, bundle.model, bundle.processor, threads, FP32)
                decoder_mode = part_mode(str(recipe.option("mode")), "decoder")
                calibration = calibration_items(fp32, ctx.calibration(), decoder=decoder_mode != "int8")
            encoder, decoder = compress(encoder, decoder, recipe, calibration)
        workspace = tempfile.TemporaryDirectory(prefix="whisper-ptq-openvino-")
        model_dir = Path(workspace.name) / "model"
        save_openvino(encoder, decoder, model_dir)
        return self._built(model_dir, bundle, recipe, threads, workspace)

    def save(self, quantized: Built, out_dir: Path) -> None:
        """The OpenVINO IR folder (encoder.xml/.bin, decoder.xml/.bin); the export's card gives the load script
        (`loaders`)."""
        shutil.copytree(quantized.model, out_dir, dirs_exist_ok=True)

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        sessions = OPENVINO_SESSIONS.replace("<properties>", repr(plugin_properties(recipe)))
        imports = ("import openvino", "from openvino.preprocess import PrePostProcessor")
        return [graph_loader("openvino", ("openvino",), imports, sessions, english_only)]

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        import torch

        from whisper_ptq.engines.openvino import DECODER, ENCODER

        missing = [f for f in (ENCODER, DECODER) if not (saved_dir / f).is_file()]
        if missing:
            raise UserError(f"{saved_dir} holds no OpenVINO model ({missing[0]} is missing)")
        return self._built(saved_dir, bundle, recipe, torch.get_num_threads())

    def _built(self, model_dir: Path, bundle: Any, recipe: Recipe, threads: int, workspace: Any = None) -> Built:
        import openvino as ov

        from whisper_ptq.engines.openvino import DECODER, ENCODER, openvino_engine

        properties = plugin_properties(recipe)
        encoder, decoder = (str(model_dir / graph) for graph in (ENCODER, DECODER))
        transcriber = openvino_engine(encoder, decoder, bundle.model, bundle.processor, threads, properties, workspace)
        info = {
            "engine": f"openvino {ov.__version__}, CPU plugin, {threads} threads",
            "plugin_properties": properties,
            "dynamic_quantization": dynamic_quantization_here(recipe),
            **ir_facts(model_dir, bundle.model),
        }
        return Built(transcriber, model_dir, info)


# The calibration pass runs the graphs as converted, unquantized: nothing to quantize dynamically.
FP32 = {part: {"INFERENCE_PRECISION_HINT": "f32"} for part in PARTS}


def plugin_properties(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The CPU plugin's compile properties of each graph a recipe sets (the threads are the run's own)."""
    return {
        part: {
            "INFERENCE_PRECISION_HINT": str(recipe.option("precision")),
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": int(recipe.option(f"dynamic_quant_{part}")),  # type: ignore[arg-type]
        }
        for part in PARTS
    }


def run_time_groups(mode: str, values: dict[str, OptionValue]) -> dict[str, int]:
    """Each weight-compressed graph's group of the CPU plugin's dynamic quantization (0: off)."""
    compressed = [part for part in PARTS if part_mode(mode, part) in ("int8", "int4")]
    return {part: int(values[f"dynamic_quant_{part}"]) for part in compressed}  # type: ignore[arg-type]


def run_time_note(mode: str, values: dict[str, OptionValue]) -> str:
    """What a recipe's description adds where the CPU plugin may quantize its weight-compressed linears' inputs
    at run time (`dynamic_quantization_here`)."""
    groups = run_time_groups(mode, values)
    if not any(groups.values()):
        return ""
    each = ", ".join(f"{part} in groups of {g}" if g else f"{part} not" for part, g in groups.items())
    return f"; on a VNNI CPU the plugin quantizes the inputs of its int8/int4 linears at run time ({each})"


def dynamic_quantization_here(recipe: Recipe) -> dict[str, int]:
    """The group each graph's int8/int4-weight linears have their inputs quantized to int8 in by the CPU plugin on
    this CPU, at run time (0: none, they compute in the recipe's precision). The plugin does so only where oneDNN
    may use VNNI, AVX-512's or AVX-VNNI (`useDynamicQuantizationImpl` of its FullyConnected executor): so
    "weight-only" ov-int8 multiplies int8 activations on a VNNI CPU, and float ones on an AVX2 one."""
    groups = run_time_groups(str(recipe.option("mode")), dict(recipe.options)) if has_vnni() else {}
    return {part: groups.get(part, 0) for part in PARTS}


def calibration_items(fp32: Any, audios: list[Any], decoder: bool = True) -> dict[str, list[dict]]:
    """NNCF calibration data of each graph: the encoder's features of each calibration utterance, and (unless
    `decoder` is false) the decoder's inputs at every step of greedy-decoding it with the fp32 models
    (`GraphDecoding.calibration_feeds`)."""
    per_clip = [fp32.calibration_feeds(audio, decode=decoder) for audio in audios]
    return {
        "encoder": [encoder for encoder, _ in per_clip],
        "decoder": [step for _, steps in per_clip for step in steps],
    }


def part_mode(mode: str, part: str) -> str:
    """The mode one graph (encoder or decoder) is compressed in: ptq-encoder is ptq for the encoder and int8
    weight-only for the decoder, every other mode is the same for both."""
    return {"encoder": "ptq", "decoder": "int8"}[part] if mode == "ptq-encoder" else mode


def compress(encoder: Any, decoder: Any, recipe: Recipe, calibration: dict[str, list[dict]] | None) -> tuple[Any, Any]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    symmetric = bool(recipe.option("symmetric"))
    done = []
    for part, model in zip(PARTS, (encoder, decoder), strict=True):
        mode = part_mode(str(recipe.option("mode")), part)
        data = None if calibration is None else calibration[part]
        dataset = None if not data else nncf.Dataset(data)
        if mode == "ptq":
            alpha = float(recipe.option(f"smooth_quant_{part}"))  # type: ignore[arg-type]
            smooth = AdvancedSmoothQuantParameters(matmul=alpha)
            model = nncf.quantize(
                model,
                dataset,
                subset_size=len(data or ()),
                model_type=nncf.ModelType.TRANSFORMER,
                advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=smooth),
            )
        elif mode == "int8":
            weights = nncf.CompressWeightsMode.INT8_SYM if symmetric else nncf.CompressWeightsMode.INT8_ASYM
            with numpy_weight_lowering():
                model = nncf.compress_weights(model, mode=weights)
        else:
            weights = nncf.CompressWeightsMode.INT4_SYM if symmetric else nncf.CompressWeightsMode.INT4_ASYM
            options = {key: bool(recipe.option(key)) for key in CALIBRATED_OPTIONS}
            model = nncf.compress_weights(
                model,
                mode=weights,
                group_size=int(recipe.option("group_size")),  # type: ignore[arg-type]
                ratio=float(recipe.option("ratio")),  # type: ignore[arg-type]
                dataset=dataset,
                subset_size=len(data or ()) or 128,
                **options,
            )
        done.append(model)
    return done[0], done[1]


@contextmanager
def numpy_weight_lowering() -> Iterator[None]:
    """NNCF's numpy int8 weight lowering instead of its "optimized" one, which compiles an OpenVINO model per
    weight: whisper-base's 49 decoder linears took 3.0 s, 1.3 of them compiling, against 2.0 s in numpy, with
    bit-identical weights, scales and zero points (compared on every constant of both graphs)."""
    saved = os.environ.get(NNCF_NUMPY_LOWERING)
    os.environ[NNCF_NUMPY_LOWERING] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[NNCF_NUMPY_LOWERING]
        else:
            os.environ[NNCF_NUMPY_LOWERING] = saved


def ir_facts(model_dir: Path, model: Any) -> dict[str, Any]:
    """Which element types the IR stores its constants in, and the stored bits per linear weight: the bytes of
    the constants feeding the linears (weights, scales, zero points) over the linears' weight count, the LM head
    (the tied embedding) excluded, as `base.linear_bits_per_weight` counts."""
    import openvino as ov

    from whisper_ptq.backends.base import linear_layers
    from whisper_ptq.engines.openvino import DECODER, ENCODER

    core, vocab = ov.Core(), model.config.vocab_size
    types: dict[str, int] = {}
    stored = 0
    for graph in (ENCODER, DECODER):
        ir = core.read_model(model_dir / graph)
        for op in ir.get_ordered_ops():
            if op.get_type_name() != "Constant":
                continue
            kind = op.get_element_type().get_type_name()  # "f32", "u8", "i64" (str() gives "<Type: 'float32'>")
            if op.get_output_partial_shape(0).rank.get_length() >= 2:
                types[kind] = types.get(kind, 0) + 1
            if kind not in ("i64", "i32") and _feeds_linear(op) and vocab not in list(op.get_output_shape(0)):
                stored += op.get_byte_size()
    return {
        "ir_constant_types": types,
        "linear_bits_per_weight": 8 * stored / sum(linear_layers(model).values()),
    }


def _feeds_linear(constant: Any) -> bool:
    """Whether a constant reaches a MatMul's weight input through weight-decompression ops only (Convert,
    Subtract, Multiply, Reshape, Transpose), i.e. is part of a linear's stored weight."""
    decompression = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose"}
    frontier = [constant]
    while frontier:
        node = frontier.pop()
        for output in node.outputs():
            for target in output.get_target_inputs():
                consumer = target.get_node()
                kind = consumer.get_type_name()
                if kind == "MatMul" and target.get_index() == 1:
                    return True
                if kind in decompression:
                    frontier.append(consumer)
    return False
