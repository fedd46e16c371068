"""fp32 ONNX -> one quantization, with onnxruntime's own tools (one function per scheme)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .modelio import is_large, save_model
from .options import OnnxOptions


@dataclass(frozen=True)
class QuantContext:
    """What the quantizers need to know about the source besides the fp32 graph."""

    config: dict
    tokenizer: object
    input_names: tuple[str, ...]


def to_fp16(src: Path, dst: Path, opts: OnnxOptions, ctx: QuantContext) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: callers keep feeding int64 ids and reading float32 outputs
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    save_model(model, dst)
    return {"keep_io_types": True}


def to_int8_dynamic(src: Path, dst: Path, opts: OnnxOptions, ctx: QuantContext) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=opts.per_channel, reduce_range=opts.reduce_range,
                     weight_type=QuantType[opts.weight_type], use_external_data_format=is_large(src))
    return {"per_channel": opts.per_channel, "reduce_range": opts.reduce_range, "weight_type": opts.weight_type}


def _weight_matmuls(src: Path) -> list:
    """MatMul nodes with a constant weight (activation x activation products stay float)."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    return [(n.name, next(shapes[i] for i in n.input if i in shapes))
            for n in graph.node if n.op_type == "MatMul" and any(i in shapes for i in n.input)]


def static_nodes(src: Path, opts: OnnxOptions, config: dict) -> list[str]:
    matmuls = _weight_matmuls(src)
    if not opts.static_skip_ffn_down:
        return [name for name, _ in matmuls]
    down = (int(config["intermediate_size"]), int(config["hidden_size"]))
    return [name for name, shape in matmuls if shape != down]


def to_int8_static(src: Path, dst: Path, opts: OnnxOptions, ctx: QuantContext) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import make_reader

    nodes = static_nodes(src, opts, ctx.config)
    reader = make_reader(ctx.tokenizer, ctx.input_names, opts.calibration_texts)
    # QDQ with uint8 activations and int8 weights: the format onnxruntime's CPU kernels fuse best
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=nodes, per_channel=opts.per_channel, reduce_range=opts.reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType[opts.weight_type],
                    calibrate_method=CalibrationMethod[opts.calibration_method],
                    use_external_data_format=is_large(src))
    return {"format": "QDQ", "calibration_method": opts.calibration_method,
            "calibration_samples": len(opts.calibration_texts), "quantized_matmuls": len(nodes),
            "skipped_ffn_down": opts.static_skip_ffn_down, "per_channel": opts.per_channel}


def to_int4(src: Path, dst: Path, opts: OnnxOptions, ctx: QuantContext) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=opts.block_size, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=is_large(src))
    return {"bits": 4, "block_size": opts.block_size, "symmetric": True, "op": "MatMulNBits"}


QUANTIZERS = {"fp16": to_fp16, "int8-dynamic": to_int8_dynamic, "int8-static": to_int8_static, "int4": to_int4}

__all__ = ["QuantContext", "QUANTIZERS", "static_nodes"]
