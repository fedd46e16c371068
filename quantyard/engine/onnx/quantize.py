"""fp32 ONNX -> one quantization, with onnxruntime's own tools (one function per scheme)."""

from __future__ import annotations

import shutil
import tempfile
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
    """Dynamic int8: weights int8 per output column, activations quantized at run time.

    Text encoders get one activation scale per token row, their few outlier input channels kept
    in float, and embedding tables quantized per row (rowquant.py); programs (no tokenizer to
    calibrate with) get onnxruntime's quantize_dynamic (one scale per activation tensor), which
    a text encoder can ask for with activation_scales "tensor" (then after smoothing: smooth.py).

    Measured on all-MiniLM-L6-v2, worst mean-pooled cosine vs PyTorch over the held-apart
    sentences (heldout.py, batch 1; benchmarks/bench_onnx_int8.py), all from this engine's fused fp32
    graph, size:
      quantize_dynamic QInt8 per-channel (onnxruntime's recipe)      0.9667   22.8 MB
      transformers.js's settings (+ reduce_range, MatMulConstBOnly)  0.9575   22.8 MB
      smoothing + QUInt8 (the previous default)                      0.9896   22.9 MB
      weights alone fake-quantized (float activations)               0.9975
      onnxruntime's Gather (embedding) quantization alone            0.9983   (one scale per table)
      per-row embeddings alone                                       0.99996
      per-row activations + per-row embeddings                       0.9895
      ... + smoothing                                                0.9949
      ... + outlier channels in float, no smoothing (default)        0.9982   23.7 MB
      ... the same with QInt8 weights                                0.9983   23.7 MB
      ... symmetric int8 rows (no zero point, fewer nodes)           0.9964   23.6 MB
    (the symmetric rows need onnxruntime's s8s8 MatMulInteger, several times slower on x86.)
    The remaining loss is spread over the layers (no few MatMuls worth leaving float). QUInt8
    weights avoid the u8*s8 saturation of pre-VNNI x86 kernels; QInt8 runs faster on a VNNI CPU.
    With row scales a sentence's output no longer depends on what it is batched with. Their cost is
    speed: ~15 extra plain nodes per MatMul input make batch 1 slower than per-tensor int8 (MiniLM,
    one thread: 9.6 ms vs 4.5 ms, fp32 8.6 ms; batch 8: 34.7 vs 27.6 vs 40.4 ms), so a job after
    speed passes activation_scales "tensor"."""
    scales = opts.activation_scales or ("row" if ctx.tokenizer is not None else "tensor")
    smoothing = opts.smooth_activations if opts.smooth_activations is not None else scales == "tensor"
    info = {"activation_scales": scales, "per_channel": opts.per_channel, "reduce_range": opts.reduce_range,
            "weight_type": opts.weight_type}
    with tempfile.TemporaryDirectory(dir=Path(dst).parent, prefix=".smooth-") as tmp:
        # smoothing and outlier channels calibrate on text: programs are quantized as they are
        if smoothing and ctx.tokenizer is not None:
            from .smooth import smooth

            smoothed = Path(tmp) / "smoothed.onnx"
            info["smoothing"] = smooth(src, smoothed, ctx.tokenizer, ctx.input_names, opts.calibration_texts,
                                       Path(tmp))
            src = smoothed
        if scales == "row":
            info.update(_row_quantize(src, dst, opts, ctx, Path(tmp)))
            return info
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), per_channel=opts.per_channel, reduce_range=opts.reduce_range,
                         weight_type=QuantType[opts.weight_type], use_external_data_format=is_large(src))
    return info


def _row_quantize(src: Path, dst: Path, opts: OnnxOptions, ctx: QuantContext, work: Path) -> dict:
    from .rowquant import outlier_channels, quantize_rows
    from .smooth import calibration_feeds

    outliers = None
    if ctx.tokenizer is not None:
        feeds = calibration_feeds(ctx.tokenizer, ctx.input_names, opts.calibration_texts)
        outliers = outlier_channels(src, feeds, work)
    rows = work / "rows.onnx"
    info = quantize_rows(src, rows, weight_type=opts.weight_type, outliers=outliers)
    fused = _fused_embeddings(rows)
    if not fused:
        shutil.move(rows, dst)
        return info
    # the optimizer fused DistilBERT-style embeddings into one EmbedLayerNormalization op: only
    # onnxruntime's quantizer handles that op (QEmbedLayerNormalization, one scale per table)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(rows), str(dst), op_types_to_quantize=["EmbedLayerNormalization"], per_channel=opts.per_channel,
                     weight_type=QuantType[opts.weight_type], use_external_data_format=is_large(rows))
    return {**info, "embed_layer_norms_per_tensor": fused}


def _fused_embeddings(path: Path) -> int:
    import onnx

    return sum(n.op_type == "EmbedLayerNormalization" for n in onnx.load(str(path), load_external_data=False).graph.node)


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
