"""GET /v1/sources/{id}/frontier and `quantyard compare` / `quantyard show` against a real catalog
(SQLite and Postgres): every listed artifact of the source with its numbers, the Pareto flags
checked against a brute-force dominance over the seeded rows, org scoping, withdrawn and deleted
artifacts and importance matrices left out."""

from __future__ import annotations

import hashlib

import pytest
from click.testing import CliRunner

from quantyard import catalog, cli
from tests.api import archives
from tests.api.conftest import build_client, make_key, make_settings, upload
from tests.api.test_cli_catalog import _api


def _quality(kl: float, ppl_ratio: float, top1: float) -> dict:
    return {"n_ctx": 512, "n_chunks": 4, "n_tokens": 1024, "ppl": 10 * ppl_ratio, "ppl_source": 10.0,
            "ppl_ratio": ppl_ratio, "mean_kl": kl, "mean_kl_ci95": kl / 10, "kl_p99": kl * 5, "kl_max": kl * 9,
            "top1_agreement": top1, "mean_delta_p": -0.01, "rms_delta_p": 0.05, "reference_top_k": 64,
            "eval_seconds": 1.5, "eval_seconds_per_1k_tokens": 1.46}


SPEED = {"pp_tokens_per_s": 812.5, "tg_tokens_per_s": 61.25, "threads": 2, "n_prompt": 512, "n_gen": 128}
# name, format, quantization, size, metrics (validation's mean_kl differs from the report's on purpose)
ROWS = [
    ("f16", "gguf", "F16", 3000, {"mean_kl": 0.00001, "bits_per_weight": 16.0, "quality": _quality(0.0001, 1.0, 0.999)}),
    ("q8", "gguf", "Q8_0", 1600, {"mean_kl": 0.0001, "bits_per_weight": 8.5, "quality": _quality(0.002, 1.001, 0.99),
                                  "speed": SPEED}),
    ("q6", "gguf", "Q6_K", 1700, {"mean_kl": 0.0003, "quality": _quality(0.004, 1.002, 0.98)}),  # dominated by q8
    ("q4", "gguf", "Q4_K_M", 900, {"mean_kl": 0.003, "quality": _quality(0.03, 1.02, 0.93)}),
    ("q4s", "gguf", "Q4_K_S", 900, {"mean_kl": 0.004, "quality": _quality(0.03, 1.03, 0.92)}),  # a tie with q4
    ("q2", "gguf", "Q2_K", 600, {"mean_kl": 0.04, "quality": _quality(0.4, 1.3, 0.7)}),
    ("old", "gguf", "Q5_K_M", 1100, {"mean_kl": 0.01, "top1_agreement": 0.96}),  # validation only: no report
    ("i8", "onnx", "int8-dynamic", 1500, {"cosine_min": 0.996, "latency_ms_p50": 3.5}),  # no KL: never optimal
]
HIDDEN = [("imx", "imatrix", "imatrix", 50, {}), ("wd", "gguf", "Q3_K_M", 700, {"quality": _quality(0.05, 1.05, 0.9)}),
          ("del", "gguf", "IQ4_XS", 800, {"quality": _quality(0.01, 1.01, 0.95)})]


def _seed(client, source: dict, tmp_path) -> dict[str, str]:
    app, ids = client.app, {}
    with app.state.session_factory.begin() as s:
        for name, fmt, quant, size, metrics in ROWS + HIDDEN:
            path = tmp_path / f"{name}.bin"
            path.write_bytes(name.encode() * (size // len(name)) + b"x" * (size % len(name)))
            stored = app.state.store.put_file(f"artifacts/{name}/{path.name}", path)
            art = catalog.record_artifact(
                s, job_id=None, target_id=None, source_id=source["id"], format=fmt, quantization=quant,
                sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
                filename=f"tiny-{quant}.{fmt}", metrics=metrics, metadata={"made_on": {"hardware_class": "cpu"}},
                engine_version="test", recipe={}, recipe_hash=hashlib.sha256(name.encode()).hexdigest(), actor="test")
            ids[name] = art.id
    with app.state.session_factory.begin() as s:
        catalog.withdraw_artifact(s, artifact_id=ids["wd"], reason="test", actor="test")
        catalog.delete_artifact(s, artifact_id=ids["del"], reason="test", actor="test")
    return ids


def _expected_pareto(loss: str) -> set[str]:
    """Brute force over ROWS: optimal when no other row with a known loss is no larger and no
    worse, and better in one."""
    def value(metrics):
        q = metrics.get("quality")
        return q[loss] if q else (metrics.get("mean_kl") if loss == "mean_kl" else None)

    known = [(name, size, value(m)) for name, _, _, size, m in ROWS if value(m) is not None]
    return {a for a, sa, la in known
            if not any(sb <= sa and lb <= la and (sb < sa or lb < la) for b, sb, lb in known if b != a)}


@pytest.fixture
def seeded(any_db_client, tmp_path):
    r = upload(any_db_client, archives.model_tar_gz())
    assert r.status_code == 201, r.text
    return any_db_client, r.json(), _seed(any_db_client, r.json(), tmp_path)


@pytest.mark.parametrize("loss", ["mean_kl", "ppl_ratio"])
def test_frontier_lists_every_artifact_with_its_numbers_and_pareto_flag(seeded, loss):
    client, source, ids = seeded
    r = client.get(f"/v1/sources/{source['id']}/frontier", params={"loss": loss})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source_id"] == source["id"] and body["loss"] == loss
    items = {i["artifact_id"]: i for i in body["items"]}
    names = {v: k for k, v in ids.items()}
    assert {names[a] for a in items} == {row[0] for row in ROWS}  # withdrawn, deleted, imatrix left out
    assert [i["size_bytes"] for i in body["items"]] == sorted(i["size_bytes"] for i in body["items"])
    assert {names[a] for a, i in items.items() if i["pareto"]} == _expected_pareto(loss)
    for name, fmt, quant, size, metrics in ROWS:
        item = items[ids[name]]
        q = metrics.get("quality") or {}
        assert (item["format"], item["name"], item["size_bytes"]) == (fmt, quant, size)
        assert item["mean_kl"] == (q.get("mean_kl") if q else metrics.get("mean_kl"))  # the report's wins
        assert item["ppl_ratio"] == q.get("ppl_ratio")
        assert item["bits_per_weight"] == metrics.get("bits_per_weight")
    assert items[ids["q8"]]["speed"] == {"pp_tokens_per_s": 812.5, "tg_tokens_per_s": 61.25, "threads": 2,
                                         "latency_ms_p50": None, "throughput_seq_per_s": None,
                                         "hardware_class": "cpu"}
    assert items[ids["i8"]]["speed"]["latency_ms_p50"] == 3.5 and items[ids["q4"]]["speed"] is None


def test_frontier_is_org_scoped_and_checks_its_parameters(seeded, tmp_path):
    client, source, _ = seeded
    assert client.get("/v1/sources/src_missing/frontier").status_code == 404
    r = client.get(f"/v1/sources/{source['id']}/frontier", params={"loss": "top1"})
    assert r.status_code == 422 and "loss" in r.text
    settings = client.app.state.settings
    other = make_key(settings, role="viewer", org="other-org")[1]
    r = client.get(f"/v1/sources/{source['id']}/frontier", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 404, r.text  # another tenant's source is a missing one


def test_compare_and_show_print_the_numbers(seeded, monkeypatch):
    client, source, ids = seeded
    monkeypatch.setattr(cli, "_client", lambda server: _api(client))
    result = CliRunner().invoke(cli.main, ["compare", source["id"]])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1] if line.startswith("*") else line.split()[0]: line
             for line in result.output.splitlines()[1:-1]}
    assert lines[ids["q8"]].startswith("*") and "0.00200" in lines[ids["q8"]] and "812.5" in lines[ids["q8"]]
    assert not lines[ids["q6"]].startswith("*") and "1.0020" in lines[ids["q6"]]
    assert result.output.splitlines()[-1].startswith("* Pareto-optimal in size vs mean_kl (8 artifacts)")
    result = CliRunner().invoke(cli.main, ["show", ids["q8"]])
    assert result.exit_code == 0, result.output
    assert "mean KL 0.002000 ± 0.000200" in result.output and "ratio 1.0010" in result.output
    assert "pp512 812.5 t/s, tg128 61.2 t/s, 2 threads on cpu" in result.output
    result = CliRunner().invoke(cli.main, ["compare", "src_missing"])
    assert result.exit_code != 0 and "src_missing" in result.output


def test_frontier_of_a_source_without_artifacts_is_empty(tmp_path):
    with build_client(make_settings(tmp_path / "data")) as client:
        source = upload(client, archives.model_tar_gz()).json()
        body = client.get(f"/v1/sources/{source['id']}/frontier").json()
        assert body == {"source_id": source["id"], "loss": "mean_kl", "items": []}
