"""Lineage queries over any depth (recursive CTE) on SQLite and Postgres: upstream, downstream,
depth limits, the recipe of every edge, cycles, tenant scoping, and artifacts recorded from a
withdrawn parent."""

from __future__ import annotations

import pytest

from quantyard import catalog

ENGINE = "quantyard-engine/9.9"


def _recipe(source, quant: str, **inputs) -> dict:
    target = {"format": "gguf", "quantization": quant, "params": {}}
    return {"input_sha256": source.sha256, "converter": "gguf", "target": target, "engine_version": ENGINE, **inputs}


def _artifact(s, source, quant: str, parents=None, fmt: str = "gguf", meta=None, **inputs):
    sha = f"{quant.lower():0<64}"[:64]
    return catalog.record_artifact(
        s, job_id=None, target_id=None, source_id=source.id, format=fmt, quantization=quant, sha256=sha,
        size_bytes=10, uri=f"file:///x/{quant}", storage_key=f"a/{quant}", filename=f"m-{quant}.gguf", metrics={},
        metadata=meta or {}, engine_version=ENGINE, recipe=_recipe(source, quant, **inputs), recipe_hash=sha,
        parents=parents)


@pytest.fixture
def graph(factory, source):
    """source -> F16 -> Q4_K_M (+ imatrix from the source) -> Q4_K_M requantized to Q4_0 -> Q2_K:
    five generations, one node with two parents."""
    with factory.begin() as s:
        src = catalog.get_source(s, source_id=source.id)
        f16 = _artifact(s, src, "F16")
        imx = _artifact(s, src, "imatrix", fmt="imatrix", meta={"imatrix": {"dataset": "wiki.txt", "entries_count": 14,
                                                                             "chunks_count": 3}})
        q4 = _artifact(s, src, "Q4_K_M", parents=[("artifact", f16.id), ("artifact", imx.id)],
                       intermediate_sha256=f16.sha256, imatrix_sha256=imx.sha256)
        q40 = _artifact(s, src, "Q4_0", parents=[("artifact", q4.id)], intermediate_sha256=q4.sha256)
        q2 = _artifact(s, src, "Q2_K", parents=[("artifact", q40.id)], intermediate_sha256=q40.sha256)
        return {"source": src.id, "f16": f16.id, "imx": imx.id, "q4": q4.id, "q40": q40.id, "q2": q2.id}


def _ids(nodes) -> dict[str, int]:
    return {n["id"]: n["depth"] for n in nodes}


def test_downstream_of_a_source_any_depth_and_depth_one(factory, graph):
    g = graph
    with factory() as s:
        full = catalog.lineage(s, source_id=g["source"], direction="downstream")
        one = catalog.lineage(s, source_id=g["source"], direction="downstream", depth=1)
    assert _ids(full["downstream"]) == {g["f16"]: 1, g["imx"]: 1, g["q4"]: 2, g["q40"]: 3, g["q2"]: 4}
    assert [n["depth"] for n in full["downstream"]] == sorted(n["depth"] for n in full["downstream"])
    assert full["upstream"] == [] and full["node"]["type"] == "source"
    assert len(full["edges"]) == 6  # src->f16, src->imx, f16->q4, imx->q4, q4->q40, q40->q2
    assert _ids(one["downstream"]) == {g["f16"]: 1, g["imx"]: 1}
    assert {(e["parent"]["id"], e["child"]["id"]) for e in one["edges"]} == {(g["source"], g["f16"]),
                                                                          (g["source"], g["imx"])}


def test_upstream_of_the_last_generation_with_every_recipe(factory, graph):
    g = graph
    with factory() as s:
        full = catalog.lineage(s, artifact_id=g["q2"], direction="upstream")
        one = catalog.lineage(s, artifact_id=g["q2"], direction="upstream", depth=1)
    assert _ids(full["upstream"]) == {g["q40"]: 1, g["q4"]: 2, g["f16"]: 3, g["imx"]: 3, g["source"]: 4}
    assert _ids(one["upstream"]) == {g["q40"]: 1}
    assert full["downstream"] == []
    for edge in full["edges"]:
        made_by = edge["made_by"]
        assert made_by["converter"] == "gguf" and made_by["engine_version"] == ENGINE
        assert edge["recipe"]["target"]["quantization"] == made_by["quantization"]
        assert made_by["inputs"]["source_sha256"] == "a" * 64
    into_q4 = [e for e in full["edges"] if e["child"]["id"] == g["q4"]]
    assert {e["parent"]["id"] for e in into_q4} == {g["f16"], g["imx"]}
    imatrix = into_q4[0]["made_by"]["inputs"]["imatrix"]
    assert imatrix["artifact_id"] == g["imx"] and imatrix["dataset"] == "wiki.txt" and imatrix["chunks_count"] == 3
    assert into_q4[0]["made_by"]["inputs"]["intermediate_sha256"].startswith("f16")
    # A node's own recipe is the edge that reached it (compatible with cards and BOMs).
    q40 = next(n for n in full["upstream"] if n["id"] == g["q40"])
    assert q40["recipe"]["target"]["quantization"] == "Q2_K"


def test_both_directions_from_the_middle(factory, graph):
    g = graph
    with factory() as s:
        both = catalog.lineage(s, artifact_id=g["q4"])
    assert _ids(both["upstream"]) == {g["f16"]: 1, g["imx"]: 1, g["source"]: 2}
    assert _ids(both["downstream"]) == {g["q40"]: 1, g["q2"]: 2}
    assert both["artifact_id"] == g["q4"] and both["direction"] == "both" and both["depth"] is None


def test_cycles_end_the_walk(factory, graph):
    g = graph
    with factory.begin() as s:  # a corrupt or hand-made edge back to an ancestor
        catalog.add_lineage_edge(s, parent_type="artifact", parent_id=g["q2"], child_type="artifact",
                                 child_id=g["f16"], recipe={"converter": "gguf"})
    with factory() as s:
        down = catalog.lineage(s, artifact_id=g["f16"], direction="downstream")
        up = catalog.lineage(s, artifact_id=g["f16"], direction="upstream", depth=50)
        flagged = catalog.withdraw_artifact(s, artifact_id=g["q4"], reason="cycle", actor="key:t")
    assert _ids(down["downstream"]) == {g["q4"]: 1, g["q40"]: 2, g["q2"]: 3}  # f16 itself is not listed
    assert _ids(up["upstream"]) == {g["source"]: 1, g["q2"]: 1, g["q40"]: 2, g["q4"]: 3, g["imx"]: 4}
    assert {f["id"] for f in flagged["flagged"]} == {g["q40"], g["q2"], g["f16"]}


def test_bad_arguments_and_missing_nodes(factory, graph):
    with factory() as s:
        with pytest.raises(catalog.NotFound):
            catalog.lineage(s, artifact_id="art_missing")
        with pytest.raises(catalog.InvalidArgument):
            catalog.lineage(s, artifact_id=graph["q4"], direction="sideways")
        with pytest.raises(catalog.InvalidArgument):
            catalog.lineage(s, artifact_id=graph["q4"], depth=0)
        with pytest.raises(catalog.InvalidArgument):
            catalog.lineage(s, artifact_id=graph["q4"], source_id=graph["source"])


def test_other_organisations_nodes_are_invisible(factory, graph):
    g = graph
    with factory.begin() as s:
        for row in [catalog.get_source(s, source_id=g["source"])] + [
                catalog.get_artifact(s, artifact_id=g[k]) for k in ("f16", "imx", "q4", "q40", "q2")]:
            row.organization_id = "org_a"
        catalog.get_artifact(s, artifact_id=g["q40"]).organization_id = "org_b"
    with factory() as s:
        scoped = catalog.lineage(s, source_id=g["source"], direction="downstream", organization_id="org_a")
        with pytest.raises(catalog.NotFound):
            catalog.lineage(s, artifact_id=g["q40"], organization_id="org_a")
    # q40 belongs to another tenant: neither it nor what lies beyond it is shown.
    assert _ids(scoped["downstream"]) == {g["f16"]: 1, g["imx"]: 1, g["q4"]: 2}


def test_an_artifact_recorded_from_a_withdrawn_parent_is_born_flagged(factory, graph):
    g = graph
    with factory.begin() as s:
        catalog.withdraw_artifact(s, artifact_id=g["q2"], reason="too lossy", actor="key:m")
    with factory.begin() as s:
        src = catalog.get_source(s, source_id=g["source"])
        child = _artifact(s, src, "Q3_K_S", parents=[("artifact", g["q2"])])
        assert catalog.withdrawal_of(child)["root"] == {"type": "artifact", "id": g["q2"]}
        events = catalog.audit_events(s, resource_type="artifact", resource_id=child.id)
        assert [e.action for e in events] == ["artifact.withdrawn", "artifact.create"]
