"""Activation smoothing before dynamic int8 (SmoothQuant's idea, shrink-only).

Dynamic int8 quantizes each MatMul's input with one scale per tensor. Transformer encoders carry
a few hidden channels whose values are tens of times the median (after layer norms, GELU), so
that one scale leaves the other channels a handful of levels: short sentences suffered most
(all-MiniLM-L6-v2: pooled cosine 0.9825 on "Hello!"). Here each outlier channel j of a weight
MatMul's input is divided by s_j and row j of the weight multiplied by s_j: the same product in
float, a narrower activation range for the quantizer. Only outlier channels are ever shrunk
(s_j >= 1): a channel that calibration saw small is never amplified, so text unlike the
calibration set can't blow up the range (plain SmoothQuant scaling did, to 0.94 on MiniLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .modelio import save_model

# s_j = max(1, amax_j / percentile(amax, PERCENTILE)) ** ALPHA; measured on MiniLM (see
# quantize.py): alpha 0.5 at the 90th percentile gave the best worst case on unseen short text.
ALPHA = 0.5
PERCENTILE = 90.0


def _groups(graph) -> dict[str, list]:
    """Activation name -> the MatMul nodes that multiply it by a 2-D weight used nowhere else."""
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            w = inits.get(node.input[1])
            if w is not None and len(w.dims) == 2 and uses[w.name] == 1 and node.input[0] not in inits:
                groups.setdefault(node.input[0], []).append((node, w))
    return groups


def calibration_feeds(tokenizer, names: Sequence[str], texts: Sequence[str]) -> list[dict]:
    """One batch per text, plus all texts padded together: padded positions reach the
    quantizer too in batched use, so their ranges count."""
    import numpy as np

    batches = [[t] for t in texts] + [list(texts)]
    feeds = []
    for batch in batches:
        enc = tokenizer(batch, padding=True, return_tensors="np")
        feeds.append({n: enc[n].astype(np.int64) for n in names})
    return feeds


def activation_amax(model, activations: Sequence[str], feeds: list[dict], work: Path) -> dict:
    """Per-channel max |x| of each activation over the calibration batches (fp32 onnxruntime)."""
    import copy

    import numpy as np
    import onnx
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    present = {o.name for o in probe.graph.output}
    for name in activations:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = work / "smooth-probe.onnx"
    save_model(probe, path)  # a file, not bytes: a model over 2 GB can't be serialized in memory
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    amax: dict = {}
    for feed in feeds:
        values = sess.run(list(activations), feed)
        for name, value in zip(activations, values, strict=False):
            channel = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            amax[name] = channel if name not in amax else np.maximum(amax[name], channel)
    return amax


def smooth(src: Path, dst: Path, tokenizer, names: Sequence[str], texts: Sequence[str], work: Path, *,
           alpha: float = ALPHA, percentile: float = PERCENTILE) -> dict:
    """Write the smoothed fp32 model at `dst` (same outputs); return what was done."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    groups = _groups(model.graph)
    amax = activation_amax(model, list(groups), calibration_feeds(tokenizer, names, texts), Path(work))
    muls = []
    for x, members in groups.items():
        a = amax[x].astype(np.float64)
        s = np.maximum(1.0, a / max(float(np.percentile(a, percentile)), 1e-12)) ** alpha
        if s.max() <= 1.0:
            continue
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), name=f"{x}.smooth_scale")
        model.graph.initializer.append(inv)
        out = f"{x}.smoothed"
        muls.append(onnx.helper.make_node("Mul", [x, inv.name], [out], name=f"{x}.smooth"))
        for node, w in members:
            node.input[0] = out
            scaled = numpy_helper.to_array(w).astype(np.float64) * s[:, None]
            w.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), name=w.name))
    nodes = list(model.graph.node)
    for mul in muls:  # right before its first consumer keeps the graph topologically sorted
        nodes.insert(next(i for i, n in enumerate(nodes) if mul.output[0] in n.input), mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    save_model(model, dst)
    return {"smoothed_activations": len(muls), "alpha": alpha, "percentile": percentile,
            "calibration_samples": len(texts)}


__all__ = ["ALPHA", "PERCENTILE", "activation_amax", "calibration_feeds", "smooth"]
