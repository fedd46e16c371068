"""Graph rewrites that put every weight where onnxruntime's weight quantizers look for it.

The quantizers (dynamic int8, MatMulNBits int4) only quantize a MatMul whose second input is an
initializer. The dynamo exporter leaves two kinds of weight products they skip:
  - Gemm (GPT-2's Conv1D layers become addmm): rewritten as MatMul + Add, the same arithmetic;
  - MatMul(x, Transpose(W)) where W is shared with the token embedding (tied lm_head, as in
    GPT-2, Qwen2, SmolLM2): W^T becomes the MatMul's own initializer, so the output head can be
    quantized apart from the embedding table (a Gather, quantized or not on its own terms).
"""

from __future__ import annotations

from pathlib import Path

from .modelio import save_model


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _plain_gemm(node, inits: dict) -> bool:
    a = _attrs(node)
    return (node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2 and a.get("transA", 0) == 0
            and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0)


def _rewrite_gemm(node, inits: dict, new_inits: list):
    import onnx
    from onnx import numpy_helper

    weight = node.input[1]
    if _attrs(node).get("transB", 0):
        t = numpy_helper.to_array(inits[weight]).T.copy()
        weight = f"{weight}.transposed"
        new_inits.append(numpy_helper.from_array(t, weight))
    if len(node.input) < 3 or not node.input[2]:
        return [onnx.helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=node.name)]
    product = f"{node.name}.matmul_out"
    return [onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name),
            onnx.helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{node.name}.bias")]


def prepare_weights(src: Path, dst: Path) -> dict:
    """Copy of `src` at `dst` with Gemms as MatMul + Add and transposed shared weights given
    their own initializers. Returns how many of each it rewrote."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    new_inits: list = []
    nodes: list = []
    counts = {"gemm_to_matmul": 0, "untied_transposed_weights": 0}
    for node in graph.node:
        if _plain_gemm(node, inits):
            nodes += _rewrite_gemm(node, inits, new_inits)
            counts["gemm_to_matmul"] += 1
            continue
        if node.op_type == "MatMul" and node.input[1] in producer:
            t = producer[node.input[1]]
            if t.op_type == "Transpose" and t.input[0] in inits and _attrs(t).get("perm") in ([1, 0], None) \
                    and len(inits[t.input[0]].dims) == 2:
                name = f"{t.input[0]}.transposed"
                if name not in {i.name for i in new_inits}:
                    new_inits.append(numpy_helper.from_array(numpy_helper.to_array(inits[t.input[0]]).T.copy(), name))
                node.input[1] = name
                counts["untied_transposed_weights"] += 1
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _drop_dead(graph)
    save_model(model, dst)
    return counts


def _drop_dead(graph) -> None:
    """Remove nodes whose outputs nothing reads (the Transposes left behind)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


__all__ = ["prepare_weights"]
