"""Issue 13's numbers in the catalog: an artifact's quality report (metrics["quality"]) and speed
(metrics["speed"]) fill its search columns and appear in its model card and ML-BOM (the BOM
still valid CycloneDX 1.6)."""

from __future__ import annotations

import json

from quantyard import catalog
from quantyard.cards import ml_bom, model_card
from tests.catalog.test_cards import MADE_ON, _artifact, factory, front_matter, schema_error  # noqa: F401

QUALITY = {"n_ctx": 512, "n_chunks": 40, "n_tokens": 10240, "ppl": 21.53, "ppl_source": 20.11,
           "ppl_ratio": 1.0706, "mean_kl": 0.0643, "mean_kl_ci95": 0.0021, "kl_p99": 0.61, "kl_max": 2.4,
           "top1_agreement": 0.874, "mean_delta_p": -0.0081, "rms_delta_p": 0.052, "reference_top_k": 64,
           "eval_seconds": 12.0, "eval_seconds_per_1k_tokens": 1.17}
SPEED = {"pp_tokens_per_s": 812.5, "tg_tokens_per_s": 61.25, "threads": 2, "n_prompt": 512, "n_gen": 128}
METRICS = {"mean_kl": 0.0093, "top1_agreement": 0.95, "probe_tokens": 52, "bits_per_weight": 4.9,
           "quality": QUALITY, "speed": SPEED}


def _made(factory):  # noqa: F811
    with factory.begin() as s:
        source = catalog.create_source(s, name="smol", sha256="a" * 64, size_bytes=10, uri="file:///x/s",
                                       storage_key="sources/s", architecture="LlamaForCausalLM", metadata={},
                                       actor="test")
        art = _artifact(s, source, fmt="gguf", quant="Q4_K_M", sha="d" * 64, parents=[("source", source.id)],
                        metrics=METRICS, metadata={"made_on": MADE_ON})
        ids = source.id, art.id
    with factory() as s:
        art = catalog.get_artifact(s, artifact_id=ids[1])
        return art, art.to_dict(), catalog.get_source(s, source_id=ids[0]).to_dict(), catalog.lineage(s, artifact_id=ids[1])


def test_columns_take_the_evaluation_numbers_and_the_record_keeps_both(factory):  # noqa: F811
    row, art, _, _ = _made(factory)
    assert (row.mean_kl, row.top1_agreement) == (QUALITY["mean_kl"], QUALITY["top1_agreement"])
    assert art["metrics"]["mean_kl"] == 0.0093 and art["metrics"]["quality"] == QUALITY  # probe's number kept
    with factory() as s:  # the catalog's KL filter reads the evaluation's number
        found, _ = catalog.list_artifacts(s, max_mean_kl=0.05)
        assert found == []
        found, _ = catalog.list_artifacts(s, max_mean_kl=0.07)
        assert [a.id for a in found] == [art["id"]]


def test_card_shows_the_quality_report_and_speed(factory):  # noqa: F811
    _, art, source, lineage = _made(factory)
    card = model_card(art, source, lineage)
    block = front_matter(card)["quantyard"]
    assert (block["quality_mean_kl"], block["quality_ppl_ratio"], block["quality_top1_agreement"]) == (
        0.0643, 1.0706, 0.874)
    body = card.split("## Quality report", 1)[1]
    for row in ("| perplexity | 21.5300 |", "| perplexity ratio (artifact / source) | 1.0706 |",
                "| mean KL divergence vs source | 0.064300 |", "| KL divergence p99 | 0.610000 |",
                "| same top token as the source | 87.40% |", "| tokens scored | 10,240 |",
                "| prompt processing (tokens/s) | 812.5 |", "| generation (tokens/s) | 61.2 |", "| threads | 2 |"):
        assert row in body, row
    assert "hardware class `cpu`" in body.split("## Speed", 1)[1]


def test_bom_carries_quality_and_speed_and_validates(factory):  # noqa: F811
    _, art, source, lineage = _made(factory)
    bom = ml_bom(art, source, lineage)
    assert schema_error(bom) is None
    perf = {m["type"]: m for m in bom["components"][0]["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]}
    assert json.loads(perf["quality.mean_kl"]["value"]) == 0.0643
    assert json.loads(perf["quality.ppl_ratio"]["value"]) == 1.0706
    assert "10240 tokens" in perf["quality.mean_kl"]["slice"]
    assert json.loads(perf["speed.tg_tokens_per_s"]["value"]) == 61.25
    assert "hardware class cpu" in perf["speed.pp_tokens_per_s"]["slice"]
    assert json.loads(perf["mean_kl"]["value"]) == 0.0093  # the validation's, labelled as such by its key
