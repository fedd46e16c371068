"""fp32 decoder ONNX -> fp16 / int8-dynamic / int4, with onnxruntime's own tools.

int8-dynamic and int4 are block-quantized weights (MatMulNBits, 8 or 4 bits, block_size) whose
kernels quantize activations to int8 at run time (accuracy_level 4); onnxruntime's classic
quantize_dynamic stays available (int8_method "quantize_dynamic") but measured far worse on a
real LLM (decoder_options.py). Weight products are first put in the form the quantizers look
for (decoder_graph.py: Gemm -> MatMul, tied lm_head untied).

The graph's I/O keeps its types in every scheme: int64 ids in, float32 logits and float32
past/present key/values, so generate.py (and any Optimum-style consumer) drives every artifact
the same way.
"""

from __future__ import annotations

from pathlib import Path

from .decoder_options import DecoderOptions
from .modelio import is_large, save_model


def lm_head_node(path: Path) -> str | None:
    """Name of the MatMul that produces the logits (walking back through shape-only ops)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    name, seen = "logits", 0
    while name in producer and seen < 16:
        node = producer[name]
        if node.op_type in ("MatMul", "Gemm"):
            return node.name
        name, seen = node.input[0], seen + 1
    return None


def to_fp16(src: Path, dst: Path, opts: DecoderOptions) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # onnxruntime's default block list only: a wider one (Cos, Sin, Pow, ReduceMean, Softmax kept
    # in float behind casts) gave all-zero logits on SmolLM2, while the default matches
    # transformers (logits diff 0.011, cosine 1.0)
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    save_model(model, dst)
    return {"keep_io_types": True, "io": "float32 logits and past/present key/values (cast inside the graph)"}


def _prepared(src: Path, dst: Path) -> tuple[Path, dict]:
    """`src` with every weight product as MatMul(x, initializer) (decoder_graph.py), beside dst."""
    from .decoder_graph import prepare_weights

    prepared = dst.with_name(dst.name + ".prepared.onnx")
    return prepared, prepare_weights(src, prepared)


def _cleanup(prepared: Path) -> None:
    from .modelio import data_path

    prepared.unlink(missing_ok=True)
    data_path(prepared).unlink(missing_ok=True)


def to_int8_dynamic(src: Path, dst: Path, opts: DecoderOptions) -> dict:
    if opts.int8_method == "matmul_nbits":
        return _nbits(src, dst, opts, bits=8, symmetric=True, ops=("MatMul",))
    return _quantize_dynamic(src, dst, opts)


def _quantize_dynamic(src: Path, dst: Path, opts: DecoderOptions) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul"] + (["Gather"] if opts.quantize_embeddings else [])
    prepared, rewrites = _prepared(src, dst)
    try:
        head = lm_head_node(prepared)
        exclude = [head] if head and not opts.quantize_lm_head else []
        quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=ops, per_channel=opts.per_channel,
                         reduce_range=opts.reduce_range, weight_type=QuantType[opts.weight_type],
                         nodes_to_exclude=exclude, use_external_data_format=is_large(src))
    finally:
        _cleanup(prepared)
    return {"method": "quantize_dynamic", "op_types": ops, "lm_head_quantized": bool(head) and opts.quantize_lm_head,
            "embeddings_quantized": opts.quantize_embeddings, "per_channel": opts.per_channel,
            "reduce_range": opts.reduce_range, "weight_type": opts.weight_type, **rewrites}


def to_int4(src: Path, dst: Path, opts: DecoderOptions) -> dict:
    ops = ("MatMul", "Gather") if opts.quantize_embeddings else ("MatMul",)
    return _nbits(src, dst, opts, bits=4, symmetric=opts.symmetric, ops=ops)


def _nbits(src: Path, dst: Path, opts: DecoderOptions, *, bits: int, symmetric: bool, ops: tuple) -> dict:
    """Block-quantized weights (MatMulNBits, GatherBlockQuantized). accuracy_level 4: the CPU
    kernels quantize activations to int8 per block at run time (measured 2.3x faster per token
    than fp32 on SmolLM2; without it the 8-bit kernels dequantize to float and run 10x slower)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    prepared, rewrites = _prepared(src, dst)
    try:
        head = lm_head_node(prepared)
        exclude = [head] if head and not opts.quantize_lm_head else []
        quantizer = MatMulNBitsQuantizer(onnx.load(str(prepared)), bits=bits, block_size=opts.block_size,
                                         is_symmetric=symmetric, accuracy_level=4, nodes_to_exclude=exclude,
                                         op_types_to_quantize=ops)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=is_large(src))
    finally:
        _cleanup(prepared)
    return {"method": "matmul_nbits", "bits": bits, "block_size": opts.block_size, "symmetric": symmetric,
            "accuracy_level": 4, "op_types": list(ops), "lm_head_quantized": bool(head) and opts.quantize_lm_head,
            "embeddings_quantized": "Gather" in ops, **rewrites}


DECODER_QUANTIZERS = {"fp16": to_fp16, "int8-dynamic": to_int8_dynamic, "int4": to_int4}

__all__ = ["DECODER_QUANTIZERS", "lm_head_node"]
