"""fp32 ONNX -> one quantization, with onnxruntime's own tools (one function per scheme)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .modelio import is_large, save_model
from .options import OnnxOptions
from .source import encoder_dims


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
    """onnxruntime's dynamic int8 (weights int8 per output channel, activations per tensor at run
    time), after shrinking outlier activation channels into the weights (smooth.py).

    Measured on all-MiniLM-L6-v2 (worst mean-pooled cosine vs PyTorch; VALIDATION_TEXTS /
    tests' ORACLE_TEXTS / 8 short unseen texts; size vs fp32), fused graph:
      QInt8 per-channel, no smoothing (old default)   0.9911 / 0.9825 / 0.945   3.96x
      + QUInt8 weights                                0.9914 / 0.9867 / 0.959   3.95x
      per-tensor weights                              0.9575 / 0.9381 / 0.802   3.97x
      reduce_range                                    0.9900 / 0.9800 / 0.953   3.96x
      MatMul only (embedding Gather left float)       0.9922 / 0.9847 / 0.951   1.54x
      FFN down-projections left float                 0.9946 / 0.9901 / 0.974   2.70x
      smoothing (alpha 0.5, p90) + QInt8              0.9971 / 0.9917 / 0.982   3.94x
      smoothing (alpha 0.5, p90) + QUInt8 (default)   0.9977 / 0.9944 / 0.991   3.94x
    Quantizing the Gather (embeddings) costs nothing measurable (0.9994 alone); the loss is in
    the MatMuls' activations, spread over all layers (no few nodes to exclude). The dynamo
    export has no fused Attention op to quantize differently, and quantizing before the
    optimizer's fusions measured the same. QUInt8 weights also avoid the u8*s8 saturation of
    pre-VNNI x86 kernels, but run ~1.5x slower than QInt8 on a VNNI CPU (u8u8 kernels): a job
    that wants speed over the last 0.003 of cosine passes weight_type QInt8."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    info = {"per_channel": opts.per_channel, "reduce_range": opts.reduce_range, "weight_type": opts.weight_type}
    with tempfile.TemporaryDirectory(dir=Path(dst).parent, prefix=".smooth-") as tmp:
        # smoothing calibrates on text: programs (no tokenizer) are quantized as they are
        if opts.smooth_activations and ctx.tokenizer is not None:
            from .smooth import smooth

            smoothed = Path(tmp) / "smoothed.onnx"
            info["smoothing"] = smooth(src, smoothed, ctx.tokenizer, ctx.input_names, opts.calibration_texts,
                                       Path(tmp))
            src = smoothed
        quantize_dynamic(str(src), str(dst), per_channel=opts.per_channel, reduce_range=opts.reduce_range,
                         weight_type=QuantType[opts.weight_type], use_external_data_format=is_large(src))
    return info


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
    dims = encoder_dims(config)
    down = (dims["intermediate_size"], dims["hidden_size"])
    return [name for name, shape in matmuls if shape != down]


def to_int8_static(src: Path, dst: Path, opts: OnnxOptions, ctx: QuantContext) -> dict:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

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

__all__ = ["QUANTIZERS", "QuantContext", "static_nodes"]
