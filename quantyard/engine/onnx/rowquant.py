"""Dynamic int8 with one activation scale per token row (not per tensor).

onnxruntime's quantize_dynamic gives each MatMul input a single scale for the whole tensor
(DynamicQuantizeLinear). In a BERT encoder a few token rows ([CLS], [SEP], punctuation) carry
values far larger than the rest, so on short inputs, where those rows are a large share of the
tokens, every other row keeps only a handful of levels: all-MiniLM-L6-v2's pooled cosine vs
PyTorch fell to 0.99 on one-word sentences even after smoothing (smooth.py). Here each row of
the input gets its own uint8 scale and zero point, computed at run time with plain ONNX ops,
and the integer product runs in MatMulInteger as before (same weights, same file size):

    x_q = clip(round(x / s_r) + z_r, 0, 255)          s_r, z_r per row (min/max of the row)
    acc = MatMulInteger(x_q, W_q, -, z_w)             = sum_k x_q (W_q - z_w)
    y   = acc * s_r * s_w - (z_r * s_r) * (c * s_w)   c_n = sum_k (W_q - z_w)[k, n]

which is (x_q - z_r) s_r @ (W_q - z_w) s_w: the asymmetric row quantization's zero point is
removed after the product (MatMulInteger takes only a scalar a_zero_point). MatMuls that share
an input share its quantization nodes. Weights are quantized per output column, QUInt8
(asymmetric, as quantize_dynamic's per-channel QUInt8) or QInt8 (symmetric).
"""

from __future__ import annotations

from pathlib import Path

from .modelio import save_model

EPS = 1e-8  # scale floor: an all-zero row quantizes to zeros instead of dividing by zero
# An input channel stays float when calibration saw it above OUTLIER_FACTOR x the median
# channel's max |x|, at most MAX_OUTLIER_FRACTION of the channels (measured on MiniLM: see
# quantize.to_int8_dynamic).
OUTLIER_FACTOR = 4.0
MAX_OUTLIER_FRACTION = 1 / 48


def _weight_groups(graph) -> dict[str, list]:
    """Activation name -> MatMul nodes multiplying it by a constant 2-D weight."""
    inits = {t.name: t for t in graph.initializer}
    groups: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[0] not in inits:
            w = inits.get(node.input[1])
            if w is not None and len(w.dims) == 2:
                groups.setdefault(node.input[0], []).append((node, w))
    return groups


def quantize_weight(w, weight_type: str):
    """(W_q, z_w or None, s_w, c) per output column; c = column sums of W_q - z_w (float32)."""
    import numpy as np

    w = w.astype(np.float64)
    if weight_type == "QInt8":
        scale = np.maximum(np.abs(w).max(0) / 127.0, EPS)
        q = np.clip(np.rint(w / scale), -127, 127)
        colsum = q.sum(0).astype(np.float32)
        return q.astype(np.int8), None, scale.astype(np.float32), colsum
    lo, hi = np.minimum(w.min(0), 0.0), np.maximum(w.max(0), 0.0)
    scale = np.maximum((hi - lo) / 255.0, EPS)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(w / scale) + zero, 0, 255)
    return q.astype(np.uint8), zero.astype(np.uint8), scale.astype(np.float32), (q - zero).sum(0).astype(np.float32)


class _Builder:
    """Collects new nodes and constants with unique names."""

    def __init__(self, model) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(value, name=name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str, **attrs) -> str:
        import onnx

        self.nodes.append(onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def reduce(self, op_type: str, x: str, out: str) -> str:
        import numpy as np

        if self.opset >= 18:  # axes became an input in opset 18
            return self.op(op_type, [x, self.const(f"{out}.axes", np.array([-1], np.int64))], out, keepdims=1)
        return self.op(op_type, [x], out, axes=[-1], keepdims=1)


def _quantize_rows(b: _Builder, x: str) -> tuple[str, str, str]:
    """Nodes giving (x_q uint8, s_r, z_r * s_r) for activation x, one scale per last-axis row."""
    import numpy as np
    from onnx import TensorProto

    p = f"{x}.rowq"
    zero = b.const(f"{p}.zero", np.array(0.0, np.float32))
    hi = b.op("Max", [b.reduce("ReduceMax", x, f"{p}.max"), zero], f"{p}.hi")
    lo = b.op("Min", [b.reduce("ReduceMin", x, f"{p}.min"), zero], f"{p}.lo")
    span = b.op("Mul", [b.op("Sub", [hi, lo], f"{p}.span"), b.const(f"{p}.inv255", np.array(1 / 255, np.float32))],
                f"{p}.raw_scale")
    scale = b.op("Max", [span, b.const(f"{p}.eps", np.array(EPS, np.float32))], f"{p}.scale")
    zp = b.op("Round", [b.op("Div", [b.op("Neg", [lo], f"{p}.neg_lo"), scale], f"{p}.zp_raw")], f"{p}.zp")
    shifted = b.op("Add", [b.op("Round", [b.op("Div", [x, scale], f"{p}.div")], f"{p}.round"), zp], f"{p}.shifted")
    clipped = b.op("Clip", [shifted, zero, b.const(f"{p}.max255", np.array(255.0, np.float32))], f"{p}.clip")
    xq = b.op("Cast", [clipped], f"{p}.u8", to=TensorProto.UINT8)
    return xq, scale, b.op("Mul", [zp, scale], f"{p}.offset")


def _replace_matmul(b: _Builder, node, w, rows: tuple[str, str, str], weight_type: str, split) -> None:
    """node's output from the row-quantized product (+ the float product of the outlier channels)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    xq, scale, offset = rows
    p = f"{node.name or node.output[0]}.rowq"
    weight = numpy_helper.to_array(w)
    if split is not None:
        idx, x_out = split
        float_part = b.op("MatMul", [x_out, b.const(f"{p}.w_outliers", weight[idx])], f"{p}.outliers")
        weight = weight.copy()
        weight[idx] = 0.0  # those inputs are zero in x_q: their rows must not set the columns' scales
    wq, zw, sw, colsum = quantize_weight(weight, weight_type)
    inputs = [xq, b.const(f"{p}.w", wq)] + (["", b.const(f"{p}.w_zero", zw)] if zw is not None else [])
    acc = b.op("Cast", [b.op("MatMulInteger", inputs, f"{p}.acc")], f"{p}.accf", to=TensorProto.FLOAT)
    scaled = b.op("Mul", [b.op("Mul", [acc, scale], f"{p}.rs"), b.const(f"{p}.sw", sw)], f"{p}.ws")
    correction = b.op("Mul", [offset, b.const(f"{p}.csw", (colsum * sw).astype(np.float32))], f"{p}.corr")
    if split is None:
        b.op("Sub", [scaled, correction], node.output[0])
    else:
        b.op("Add", [b.op("Sub", [scaled, correction], f"{p}.int8"), float_part], node.output[0])


def _split_outliers(b: _Builder, x: str, idx, width: int) -> tuple[str, tuple]:
    """(x with the outlier channels zeroed, (idx, those channels gathered)): LLM.int8()'s
    decomposition. A few input channels of every layer norm output and GELU output are ten to
    thirty times the median; left in, each row's int8 scale spends its levels on them."""
    import numpy as np

    p = f"{x}.rowq"
    mask = np.ones(width, np.float32)
    mask[idx] = 0.0
    inliers = b.op("Mul", [x, b.const(f"{p}.inlier_mask", mask)], f"{p}.inliers")
    gathered = b.op("Gather", [x, b.const(f"{p}.outlier_idx", np.asarray(idx, np.int64))], f"{p}.outlier_x", axis=-1)
    return inliers, (np.asarray(idx, np.int64), gathered)


def _embedding_gathers(graph) -> list:
    """(Gather node, its 2-D float table) for tables looked up by id (word/position embeddings)."""
    from onnx import TensorProto

    inits = {t.name: t for t in graph.initializer}
    return [(n, inits[n.input[0]]) for n in graph.node
            if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
            and inits[n.input[0]].data_type == TensorProto.FLOAT and not any(a.name == "axis" and a.i for a in n.attribute)]


def _replace_gather(b: _Builder, node, table) -> None:
    """uint8 table with a scale and an offset per row (one embedding vector each): looking a
    row up gathers its scale and offset too. onnxruntime's Gather quantization uses one scale
    for the whole table, which cost MiniLM as much as all its MatMuls' weights together."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    p = f"{node.name or node.output[0]}.rowq"
    t = numpy_helper.to_array(table).astype(np.float64)
    lo, hi = np.minimum(t.min(1), 0.0)[:, None], np.maximum(t.max(1), 0.0)[:, None]
    scale = np.maximum((hi - lo) / 255.0, EPS)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    q = np.clip(np.rint(t / scale) + zero, 0, 255).astype(np.uint8)
    ids = node.input[1]
    rows = b.op("Cast", [b.op("Gather", [b.const(f"{p}.table", q), ids], f"{p}.q")], f"{p}.qf", to=TensorProto.FLOAT)
    s = b.op("Gather", [b.const(f"{p}.scale", scale.astype(np.float32)), ids], f"{p}.s")
    off = b.op("Gather", [b.const(f"{p}.offset", (-zero * scale).astype(np.float32)), ids], f"{p}.off")
    b.op("Add", [b.op("Mul", [rows, s], f"{p}.scaled"), off], node.output[0])


def outlier_channels(src: Path, feeds: list[dict], work: Path, *, factor: float = OUTLIER_FACTOR,
                     max_fraction: float = MAX_OUTLIER_FRACTION) -> dict:
    """Activation name -> the input channels (largest first) to keep in float, from fp32 runs of
    `src` on calibration feeds."""
    import numpy as np
    import onnx

    from .smooth import activation_amax

    model = onnx.load(str(src))
    groups = _weight_groups(model.graph)
    amax = activation_amax(model, list(groups), feeds, Path(work))
    chosen = {}
    for x, a in amax.items():
        order = np.argsort(a)[::-1][: max(1, int(len(a) * max_fraction))]
        idx = order[a[order] > factor * max(float(np.median(a)), 1e-12)]
        if len(idx):
            chosen[x] = np.sort(idx)
    return chosen


def quantize_rows(src: Path, dst: Path, *, weight_type: str = "QUInt8", outliers: dict | None = None) -> dict:
    """Every constant-weight MatMul of `src` -> row-quantized int8 (see the module docstring),
    every embedding table -> uint8 per row; everything else is left as it is. `outliers` maps an
    activation name to the input channels kept in float (outlier_channels()). Writes `dst`;
    returns what was done."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    groups = _weight_groups(graph)
    b = _Builder(model)
    replaced: dict[str, list] = {}  # first consumer's name -> nodes to put in its place
    dead = set()
    for x, members in groups.items():
        start = len(b.nodes)
        idx = (outliers or {}).get(x)
        split = None
        if idx is not None and len(idx):
            x_in, split = _split_outliers(b, x, idx, members[0][1].dims[0])
        rows = _quantize_rows(b, x_in if split is not None else x)
        for node, w in members:
            _replace_matmul(b, node, w, rows, weight_type, split)
            dead.add(id(node))
        replaced[members[0][0].output[0]] = b.nodes[start:]
    gathers = _embedding_gathers(graph)
    for node, table in gathers:
        start = len(b.nodes)
        _replace_gather(b, node, table)
        dead.add(id(node))
        replaced[node.output[0]] = b.nodes[start:]
    nodes = []
    for n in graph.node:  # each group's nodes where its first MatMul was: topological order holds
        if id(n) in dead:
            nodes.extend(replaced.pop(n.output[0], []))
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    # a float table another node still reads (tied weights) stays; the others go
    used = {t for n in nodes for t in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + b.inits)
    save_model(model, dst)
    return {"activations": "per-row uint8 (dynamic)", "row_quantized_matmuls": sum(map(len, groups.values())),
            "row_quantized_embeddings": len(gathers), "weight_type": weight_type,
            "float_outlier_channels": sum(len(v) for k, v in (outliers or {}).items() if k in groups)}


__all__ = ["outlier_channels", "quantize_rows", "quantize_weight"]
