"""ONNX Runtime: Whisper exported to ONNX from the loaded transformers model, quantized by ORT's own quantizers,
run by its CPU execution provider (`engines/onnx.py`: encoder graph with the cross-attention keys/values,
decoder graph with a self-attention KV cache; the shared greedy loop).

Quantization (`onnxruntime.quantization`) targets the linears, i.e. the MatMuls with a constant weight: the
attention MatMuls, LayerNorm, softmax, GELU and the conv stem stay fp32, as in the study's other int8 rows.
- `dynamic`: `quantize_dynamic`, int8 weights (per tensor or per output channel, `reduce_range` = 7-bit
  weights for CPUs without VNNI) and uint8 activations quantized per tensor at every call (MatMulInteger).
- `static`: `quantize_static`, QDQ format, int8 weights and activations with ranges calibrated (MinMax) on the
  calibration split: the encoder on its features, the decoder on its inputs at every step of greedy decoding.
- `int4`: `MatMulNBitsQuantizer`, 4-bit weight-only in blocks of `block_size` along the input dimension
  (MatMulNBits; `accuracy_level=4` computes with int8 activations).
The LM head, tied to the token embedding, is a quantized MatMul over its own copy unless `keep=proj_out`
keeps it reading the fp32 embedding (stored once). ORT cannot select other modules.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from whisper_ptq.backends.base import Backend, BuildContext, Built, Loader, Param, graph_loader, keep_head_param
from whisper_ptq.errors import UserError
from whisper_ptq.models.names import HEAD
from whisper_ptq.recipes import OptionValue, Recipe

MODES = ("none", "dynamic", "static", "int4")
INT8_PARAMS = ("per_channel", "reduce_range", "keep")
INT4_PARAMS = ("block_size", "symmetric", "accuracy_level", "keep")


# How the export's load script opens the two graphs with the runtime's own API (`base.graph_loader`).
ORT_SESSIONS = """\
encoder, decoder = (
    onnxruntime.InferenceSession(f"{export}/{part}.onnx", providers=["CPUExecutionProvider"])
    for part in ("encoder", "decoder")
)
encode = lambda feeds: encoder.run(None, feeds)  # noqa: E731
decode = lambda feeds: decoder.run(None, feeds)  # noqa: E731
"""


class OnnxRuntimeBackend(Backend):
    library = "onnxruntime"
    description = "ONNX Runtime: ONNX graphs exported from the model, ORT's dynamic/static int8 and int4 quantizers"
    requires = {"onnxruntime": "onnxruntime", "onnx": "onnx"}
    beam_search = False  # a step-wise engine: `engines.decoding.StepDecoding` searches greedily
    reuse_builds = True  # tracing the graphs is most of the open (backends/reuse.py)
    params = {
        "mode": Param(str, "dynamic", MODES, "none (fp32), dynamic int8, static int8 QDQ, or int4 weight-only"),
        "per_channel": Param(bool, False, help="int8 weights per output channel (default per tensor)"),
        "reduce_range": Param(bool, False, help="7-bit int8 weights, for CPUs without VNNI"),
        "block_size": Param(int, 32, help="int4: weights per scale, a power of two of at least 16"),
        "symmetric": Param(bool, False, help="int4: symmetric blocks (no zero points)"),
        "accuracy_level": Param(int, 0, (0, 1, 2, 3, 4), "int4: MatMulNBits compute type; 4 = int8 activations"),
        "keep": keep_head_param(kept_by_default=False),
    }
    named = {
        "ort-fp32": ("ONNX Runtime fp32: the exported graphs, unquantized", {"mode": "none", "keep": HEAD}),
        "ort-int8": ("ONNX Runtime dynamic int8 (per-tensor weights, uint8 activations per call)", {}),
        "ort-int8-per-channel": (
            "ONNX Runtime dynamic int8, per-channel weights",
            {"per_channel": "true"},
        ),
        "ort-int8-static": (
            "ONNX Runtime static int8 QDQ, per-channel weights, activations calibrated on the calibration split",
            {"mode": "static", "per_channel": "true"},
        ),
        "ort-int4": ("ONNX Runtime int4 weight-only MatMulNBits, blocks of 32, asymmetric", {"mode": "int4"}),
    }

    def make_recipe(self, name: str, values: dict[str, OptionValue], description: str) -> Recipe:
        mode, block = str(values["mode"]), int(values["block_size"])  # type: ignore[arg-type]
        if block < 16 or block & (block - 1):
            raise UserError(f"recipe {name!r}: block_size must be a power of two of at least 16, got {block}")
        applies = {**dict.fromkeys(("dynamic", "static"), INT8_PARAMS), "int4": INT4_PARAMS, "none": ("keep",)}[mode]
        stray = [k for k in self.params if k not in ("mode", *applies) and values[k] != self.params[k].default]
        if stray:
            raise UserError(f"recipe {name!r}: {stray[0]} does not apply to mode={mode}")
        if mode == "none":
            values = {**values, "keep": HEAD}  # nothing is quantized: the head stays tied
        per_channel = bool(values["per_channel"])
        weights = {"none": "fp32", "int4": "int4"}.get(mode, "int8")
        return Recipe(
            name=name,
            library=self.library,
            scheme={"none": "reference", "int4": "weight-only"}.get(mode, mode),
            weights=weights,
            activations="int8" if mode in ("dynamic", "static") else None,
            granularity="per-group" if mode == "int4" else ("per-channel" if per_channel else "per-tensor"),
            group_size=block if mode == "int4" else None,
            symmetric=bool(values["symmetric"]) if mode == "int4" else mode != "dynamic",
            keep=(HEAD,) if values["keep"] else (),
            devices=("cpu",),
            options=tuple(sorted((key, values[key]) for key in self.params)),
            description=description or f"ONNX Runtime {mode}",
        )

    def quantize(self, bundle: Any, recipe: Recipe, ctx: BuildContext) -> Built:
        import torch

        from whisper_ptq.engines.onnx import export_onnx, onnx_engine

        if recipe.modules:
            raise UserError(f"recipe {recipe.name!r}: ONNX Runtime quantizes every linear, it cannot select modules")
        workspace = tempfile.TemporaryDirectory(prefix="whisper-ptq-onnx-")
        model_dir, threads = Path(workspace.name) / "model", torch.get_num_threads()
        mode = str(recipe.option("mode"))
        with tempfile.TemporaryDirectory(prefix="whisper-ptq-onnx-fp32-") as scratch:
            fp32_dir = model_dir if mode == "none" else Path(scratch)
            export_onnx(bundle.model, fp32_dir, tie_head=not recipe.selects(HEAD))
            if mode != "none":
                calibration = None
                if mode == "static":
                    if ctx.calibration is None:
                        raise UserError(f"recipe {recipe.name!r} needs calibration audio")
                    fp32 = onnx_engine(fp32_dir, bundle.model, bundle.processor, threads)
                    calibration = CalibrationFeeds(fp32, ctx.calibration())
                quantize_graphs(fp32_dir, model_dir, recipe, calibration)
        transcriber = onnx_engine(model_dir, bundle.model, bundle.processor, threads, workspace)
        return Built(transcriber, model_dir, onnx_info(model_dir, recipe, threads, bundle.model))

    def save(self, quantized: Built, out_dir: Path) -> None:
        """The ONNX folder (encoder.onnx, decoder.onnx); the export's card gives the load script (`loaders`)."""
        shutil.copytree(quantized.model, out_dir, dirs_exist_ok=True)

    def loaders(self, recipe: Recipe, english_only: bool) -> list[Loader]:
        return [graph_loader("onnxruntime", ("onnxruntime",), ("import onnxruntime",), ORT_SESSIONS, english_only)]

    def load(self, bundle: Any, recipe: Recipe, saved_dir: Path, ctx: BuildContext) -> Built:
        import torch

        from whisper_ptq.engines.onnx import DECODER, ENCODER, onnx_engine

        missing = [f for f in (ENCODER, DECODER) if not (saved_dir / f).is_file()]
        if missing:
            raise UserError(f"{saved_dir} holds no ONNX Runtime model ({missing[0]} is missing)")
        threads = torch.get_num_threads()
        transcriber = onnx_engine(saved_dir, bundle.model, bundle.processor, threads)
        return Built(transcriber, saved_dir, onnx_info(saved_dir, recipe, threads, bundle.model))


class CalibrationFeeds:
    """Static calibration data: per graph, an ORT `CalibrationDataReader` over its inputs while the fp32 graphs
    transcribe the calibration audio (`GraphDecoding.calibration_feeds`), made one utterance at a time so that
    only one utterance's decoder inputs are held at once."""

    def __init__(self, fp32: Any, audios: list[Any]):
        self.fp32, self.audios = fp32, audios

    def reader(self, graph: str) -> Any:
        import_ort_quantization()
        from onnxruntime.quantization import CalibrationDataReader

        from whisper_ptq.engines.onnx import ENCODER

        per_clip = (self.fp32.calibration_feeds(audio) for audio in self.audios)
        if graph == ENCODER:
            feeds: Iterator[dict] = (encoder for encoder, _ in per_clip)
        else:
            feeds = (step for _, steps in per_clip for step in steps)

        class Reader(CalibrationDataReader):
            def get_next(self) -> dict | None:
                return next(feeds, None)

        return Reader()


def import_ort_quantization() -> None:
    """Import `onnxruntime.quantization` without the logging setup it does: its matmul_nbits_quantizer calls
    `logging.basicConfig(level=INFO)` at import, which printed hundreds of the quantizers' INFO lines an open and
    changes the logging of the user's whole process. The root logger is left as it was; later imports of the
    module find it loaded."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401 (the module that configures logging)

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def quantize_graphs(fp32_dir: Path, out_dir: Path, recipe: Recipe, calibration: CalibrationFeeds | None) -> None:
    import onnx

    import_ort_quantization()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from whisper_ptq.engines.onnx import DECODER, ENCODER

    out_dir.mkdir(parents=True, exist_ok=True)
    mode, per_channel = str(recipe.option("mode")), bool(recipe.option("per_channel"))
    reduce_range = bool(recipe.option("reduce_range"))
    for graph in (ENCODER, DECODER):
        source, target = fp32_dir / graph, out_dir / graph
        linears = weight_matmuls(onnx.load(str(source)))
        if mode == "dynamic":
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=linears,
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
            )
        elif mode == "static":
            assert calibration is not None
            quantize_static(
                source,
                target,
                calibration.reader(graph),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=linears,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                # ORT's QDQ quantizer also quantizes each MatMul's output unless told not to: the logits and the
                # MLP outputs (ranges of +-400 in tiny.en's encoder) went through one int8 scale each, WER 130%
                # on the test-clean sample (fp32 4.07%); with the outputs in fp32, 3.66%
                extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
            )
        else:
            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(source)),
                bits=4,
                block_size=int(recipe.option("block_size")),  # type: ignore[arg-type]
                is_symmetric=bool(recipe.option("symmetric")),
                accuracy_level=int(recipe.option("accuracy_level")),  # type: ignore[arg-type]
                nodes_to_include=linears,
                op_types_to_quantize=("MatMul",),
            )
            quantizer.process()
            onnx.save(quantizer.model.model, str(target))


def weight_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes whose second input is a constant (the linears)."""
    constants = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def onnx_info(model_dir: Path, recipe: Recipe, threads: int, model: Any) -> dict[str, Any]:
    import onnx
    import onnxruntime

    from whisper_ptq.backends.base import linear_layers
    from whisper_ptq.engines.onnx import DECODER, ENCODER

    ops: dict[str, int] = {}
    stored = 0
    for graph in (ENCODER, DECODER):
        proto = onnx.load(str(model_dir / graph))
        for node in proto.graph.node:
            if node.op_type in ("MatMul", "MatMulInteger", "MatMulNBits", "QuantizeLinear", "DynamicQuantizeLinear"):
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
        stored += linear_bytes(proto, model.config.vocab_size)
    return {
        "engine": f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, {threads} intra-op threads",
        "onnx_ops": ops,
        "lm_head": "quantized MatMul over a copy of the embedding" if recipe.selects(HEAD) else "fp32, tied",
        "linear_bits_per_weight": 8 * stored / sum(linear_layers(model).values()),
    }


def linear_bytes(model: Any, vocab: int) -> int:
    """Bytes of what a graph stores for its linears' weights (quantized values, scales, zero points), the LM head
    and biases excluded, as `base.linear_bits_per_weight` counts. The exporter names each linear's weight
    `onnx::MatMul_<n>`, and ORT's quantizers name what they derive from it after it (`<weight>_quantized`,
    `<weight>_scale`, `<weight>_Q4`...); the head's group is the one with a vocabulary-sized dimension."""
    import onnx

    groups: dict[str, list[Any]] = {}
    for tensor in model.graph.initializer:
        if match := re.match(r"onnx::MatMul_\d+", tensor.name):
            groups.setdefault(match.group(), []).append(tensor)
    return sum(
        onnx.numpy_helper.to_array(t).nbytes
        for group in groups.values()
        if not any(vocab in t.dims for t in group)
        for t in group
    )
