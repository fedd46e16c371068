"""Catalog search at scale: p50/p95 of typical filtered pages over N artifacts on Postgres.

Creates a fresh database, applies the migrations, seeds sources, jobs (with labels) and N
artifacts (default 1,000,000) with COPY (the artifact table's secondary indexes are dropped for
the load and rebuilt from their own definitions afterwards), runs VACUUM ANALYZE, then times each
query of QUERIES through ``quantyard.catalog.search_artifacts`` (the function the API calls):
the first page and the page after it (its cursor), ``--repeat`` times each, after two warm-up
runs. Each query's plan is checked with EXPLAIN: the table says which indexes it uses and flags a
sequential scan of ``artifacts``.

    python benchmarks/bench_catalog_search.py                 # 1M artifacts (about 4-6 min here)
    python benchmarks/bench_catalog_search.py --rows 20000    # quick
    --pg-admin-url postgresql://postgres@127.0.0.1:5432/postgres  --keep (leave the database)
    --json-out results.json

Distributions (seeded, reproducible): 8 organisations of skewed sizes (32% .. 2%), 5,000 sources
over 14 architectures, one job per 4 artifacts with labels team (8, skewed), env (3), project
(300, Zipf-like) and a rare release label; 75% GGUF (19 quantizations) / 25% ONNX (5); sizes from
the source's parameter count and the type's bits per weight; KL / top-1 by quantization with
noise; creation times spread over 365 days.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ensure_repo_on_path

ensure_repo_on_path()

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ORG_WEIGHTS = [32, 20, 15, 11, 9, 7, 4, 2]
ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM",
                 "Phi3ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel", "BertModel",
                 "RobertaModel", "DistilBertModel", "XLMRobertaModel", "BertForSequenceClassification",
                 "RobertaForSequenceClassification"]
FAMILIES = ["llama", "qwen", "mistral", "gemma", "phi", "smollm", "tinyllama", "granite", "olmo", "minilm",
            "bge", "e5", "gte", "roberta", "distilbert", "deberta"]
GGUF_QUANTS = {  # quantization: (weight, bits per weight, typical mean KL, typical top-1)
    "Q4_K_M": (22, 4.89, 0.030, 0.93), "Q8_0": (14, 8.5, 0.002, 0.985), "Q5_K_M": (10, 5.7, 0.012, 0.955),
    "Q6_K": (8, 6.56, 0.006, 0.97), "F16": (6, 16.0, 0.0002, 0.995), "Q4_K_S": (6, 4.58, 0.038, 0.92),
    "Q3_K_M": (5, 3.91, 0.09, 0.88), "Q2_K": (3, 3.35, 0.25, 0.8), "Q5_K_S": (4, 5.54, 0.014, 0.95),
    "IQ4_XS": (4, 4.25, 0.04, 0.92), "Q4_0": (4, 4.55, 0.05, 0.91), "BF16": (2, 16.0, 0.0008, 0.99),
    "Q3_K_L": (2, 4.27, 0.07, 0.89), "Q3_K_S": (2, 3.5, 0.12, 0.86), "IQ3_M": (2, 3.66, 0.1, 0.87),
    "IQ2_M": (1, 2.7, 0.4, 0.75), "IQ2_XS": (1, 2.31, 0.6, 0.7), "Q5_0": (2, 5.5, 0.015, 0.95),
    "F32": (1, 32.0, 0.0, 1.0),
}
ONNX_QUANTS = {"int8-dynamic": (40, 8.0, 0.995), "fp16": (20, 16.0, 0.9999), "fp32": (15, 32.0, 1.0),
               "int4": (15, 4.5, 0.9), "int8-static": (10, 8.0, 0.99)}
TEAMS = (["nlp", "search", "platform", "mobile", "speech", "vision", "research", "edge"],
         [30, 20, 15, 12, 8, 7, 5, 3])
ENVS = (["prod", "dev", "staging"], [50, 35, 15])
PROJECTS = 300
YEAR_START = datetime(2025, 11, 1, tzinfo=UTC)


# -------------------------------------------------------------------------------- seeding


def _pg(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def create_database(admin_url: str) -> tuple[str, str]:
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"quantyard_bench_search_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_pg(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name).render_as_string(
        hide_password=False)
    return name, url


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(_pg(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


def _iso(t: datetime) -> str:
    return t.isoformat()


def plan_rows(rows: int, rng: random.Random) -> tuple[list[str], list[tuple], list[tuple]]:
    """Organisations, sources and jobs for ``rows`` artifacts (the first draws of ``rng``: a kept
    database's facts are rebuilt from the same --rows and --seed, see ``--reuse``)."""
    orgs = [f"org_{i}" for i in range(len(ORG_WEIGHTS))]
    n_sources = max(50, min(5_000, rows // 200))
    n_jobs = max(100, rows // 4)
    sources = []
    for i in range(n_sources):
        arch = rng.choices(ARCHITECTURES, weights=[20, 15, 10, 8, 6, 5, 4, 3, 10, 5, 4, 3, 4, 3])[0]
        family = rng.choice(FAMILIES)
        params_b = rng.choice([0.1, 0.35, 0.5, 1, 1.5, 3, 7, 8, 13, 32, 70])
        name = f"{family}-{params_b:g}b-{rng.choice(['base', 'instruct', 'chat', 'code'])}-v{i}"
        org = rng.choices(orgs, weights=ORG_WEIGHTS)[0]
        created = YEAR_START + timedelta(seconds=rng.uniform(0, 300 * 86400))
        sources.append((f"src_{i:08d}", org, name, arch, params_b, created))
    jobs = []
    for i in range(n_jobs):
        src = sources[rng.randrange(n_sources)]
        labels = {"team": rng.choices(*TEAMS)[0], "env": rng.choices(*ENVS)[0],
                  "project": f"p{min(PROJECTS - 1, int(rng.paretovariate(1.1)) - 1)}"}
        if rng.random() < 0.002:
            labels["release"] = "2026.1-rc"
        created = max(src[5], YEAR_START + timedelta(seconds=rng.uniform(0, 365 * 86400)))
        jobs.append((f"job_{i:08d}", src, labels, created))
    return orgs, sources, jobs


def seed(url: str, rows: int, rng: random.Random) -> dict:
    """COPY the rows in; returns facts the queries pick their values from."""
    import psycopg

    from quantyard.catalog.search import search_text, search_tokens

    orgs, sources, jobs = plan_rows(rows, rng)
    n_jobs = len(jobs)
    t0 = time.perf_counter()
    with psycopg.connect(_pg(url)) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'artifacts' "
            "AND indexname <> 'pk_artifacts'").fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        with conn.cursor() as cur:
            with cur.copy("COPY sources (id, organization_id, name, sha256, size_bytes, uri, storage_key, "
                          "architecture, metadata, created_by, created_at) FROM STDIN") as copy:
                for sid, org, name, arch, params_b, created in sources:
                    copy.write_row((sid, org, name, _hex(rng), int(params_b * 2e9), f"s3://b/sources/{sid}",
                                    f"sources/{sid}", arch, "{}", "key:bench", _iso(created)))
            with cur.copy("COPY jobs (id, organization_id, source_id, status, progress, hardware_class, labels, "
                          "attempts, max_attempts, cancel_requested, warnings, created_by, created_at) "
                          "FROM STDIN") as copy:
                for jid, src, labels, created in jobs:
                    copy.write_row((jid, src[1], src[0], "succeeded", 1.0, "cpu", json.dumps(labels), 1, 3,
                                    False, "[]", "key:bench", _iso(created)))
            with cur.copy("COPY artifacts (id, organization_id, job_id, source_id, format, quantization, filename, "
                          "sha256, size_bytes, uri, storage_key, metrics, metadata, engine_version, recipe_hash, "
                          "created_at, architecture, label_pairs, search_text, search_tokens, mean_kl, top1_agreement, "
                          "cosine_min, bits_per_weight) FROM STDIN") as copy:
                for i in range(rows):
                    copy.write_row(_artifact_row(i, jobs[rng.randrange(n_jobs)], rng, search_text, search_tokens))
        t_copy = time.perf_counter() - t0
        for _name, ddl in indexes:
            conn.execute(ddl)
        conn.commit()
    t_index = time.perf_counter() - t0 - t_copy
    with psycopg.connect(_pg(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    t_vacuum = time.perf_counter() - t0 - t_copy - t_index
    return {"orgs": orgs, "sources": sources, "jobs": len(jobs), "copy_s": t_copy, "index_s": t_index,
            "vacuum_analyze_s": t_vacuum}


def _artifact_row(i: int, job, rng: random.Random, search_text, search_tokens) -> tuple:
    jid, src, labels, job_created = job
    sid, org, src_name, arch, params_b, _ = src
    if arch.startswith(("Bert", "Roberta", "DistilBert", "XLMRoberta")) or rng.random() < 0.08:
        fmt = "onnx"
        quant = rng.choices(list(ONNX_QUANTS), weights=[v[0] for v in ONNX_QUANTS.values()])[0]
        _, bpw, cosine = ONNX_QUANTS[quant]
        metrics = {"cosine_min": round(min(1.0, cosine - abs(rng.gauss(0, 0.004))), 6), "max_abs_diff": 0.1}
        kl = top1 = None
        cos = metrics["cosine_min"]
    else:
        fmt = "gguf"
        quant = rng.choices(list(GGUF_QUANTS), weights=[v[0] for v in GGUF_QUANTS.values()])[0]
        _, bpw, kl_typ, top1_typ = GGUF_QUANTS[quant]
        kl = round(kl_typ * math.exp(rng.gauss(0, 0.5)), 6)
        top1 = round(min(1.0, max(0.0, rng.gauss(top1_typ, 0.02))), 4)
        metrics = {"mean_kl": kl, "top1_agreement": top1, "bits_per_weight": bpw}
        cos = None
    size = int(params_b * 1e9 * bpw / 8 * rng.uniform(0.97, 1.03))
    created = job_created + timedelta(seconds=rng.uniform(60, 7200))
    filename = f"{src_name}-{quant}.{fmt}"
    pairs = sorted(f"{k}={v}" for k, v in labels.items())
    names = search_text(filename=filename, source_name=src_name, format=fmt, quantization=quant)
    return (f"art_{i:010d}_{rng.getrandbits(32):08x}", org, jid, sid, fmt, quant, filename, _hex(rng), size,
            f"s3://b/artifacts/{i}", f"artifacts/{i}", json.dumps(metrics), "{}", "quantyard-engine/0.1.0",
            _hex(rng), _iso(created), arch, pairs, names, search_tokens(names, organization_id=org), kl, top1, cos,
            bpw if fmt == "gguf" else None)


# -------------------------------------------------------------------------------- queries


def queries(facts: dict, rng: random.Random) -> list[tuple[str, dict]]:
    big, mid, small = facts["orgs"][0], facts["orgs"][3], facts["orgs"][6]
    src = next(s for s in facts["sources"] if s[1] == mid)
    end = YEAR_START + timedelta(days=365)
    return [
        ("org newest (no filter)", {"organization_id": big}),
        ("org+format+quant", {"organization_id": big, "format": "gguf", "quantization": "Q4_K_M"}),
        ("org+format+quant (small org)", {"organization_id": small, "format": "gguf", "quantization": "q5_k_m"}),
        ("org+arch+max_mean_kl", {"organization_id": big, "architecture": "Qwen2ForCausalLM", "max_mean_kl": 0.05}),
        ("org+arch+kl+top1 (strict)", {"organization_id": mid, "architecture": "LlamaForCausalLM",
                                       "max_mean_kl": 0.001, "min_top1": 0.98}),
        ("org+label team (common)", {"organization_id": big, "label": "team=nlp"}),
        ("org+label project (rare)", {"organization_id": big, "label": "project=p150"}),
        ("org+label release (0.2%)", {"organization_id": mid, "label": "release=2026.1-rc"}),
        ("org+2 labels", {"organization_id": big, "label": ["team=search", "env=prod"]}),
        ("org+size+created range", {"organization_id": big, "min_size": 1_000_000_000, "max_size": 5_000_000_000,
                                    "created_after": end - timedelta(days=90), "created_before": end - timedelta(days=30)}),
        ("org+source", {"organization_id": mid, "source_id": src[0]}),
        ("org+onnx+min_cosine", {"organization_id": big, "format": "onnx", "min_cosine": 0.995}),
        ("text: one source name", {"organization_id": mid, "q": src[2]}),
        ("text: common word", {"organization_id": big, "q": "instruct"}),
        ("text: rare word+format", {"organization_id": big, "q": "granite-70b", "format": "gguf"}),
        # a partial two-word q matching ~5% of the org: walking newest-first finds a page in ~1,000 rows
        ("text: partial words (5%)", {"organization_id": big, "q": "instruct-v4"}),
        ("sort=size org+format", {"organization_id": big, "format": "gguf", "sort": "size"}),
        ("sort=mean_kl org+max_kl", {"organization_id": big, "max_mean_kl": 0.05, "sort": "mean_kl"}),
        ("everything", {"organization_id": big, "format": "gguf", "quantization": "Q4_K_M", "label": "env=prod",
                        "max_mean_kl": 0.05, "min_size": 100_000_000, "created_after": end - timedelta(days=180)}),
    ]


ARTIFACT_INDEX_NAMES = ("ix_artifacts_", "pk_artifacts")


def _plan_nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def explain(s, params: dict, cursor: str | None) -> dict:
    """The plan search_artifacts used for this page ("query"; for free text "walk" or
    "text-index"), the index names its SQL uses on artifacts, and whether it reads artifacts
    sequentially."""
    from quantyard.catalog.search import _text_first_query, _walk_query, build_query, make_filters, search_page

    kw = {k: v for k, v in params.items() if k != "sort"}
    filters, sort = make_filters(**kw), params.get("sort", "created")
    _, used_plan = search_page(s, filters, sort=sort, cursor=cursor, limit=50)
    page = {"sort": sort, "cursor": cursor, "include_withdrawn": False, "include_deleted": False, "limit": 50}
    if used_plan == "walk":
        query = _walk_query(filters, **page)
    elif used_plan == "text-index":
        query = _text_first_query(filters, **page)
    else:
        query = build_query(filters, dialect="postgresql", **page)
    compiled = query.compile(dialect=s.get_bind().dialect)
    conn = s.connection()
    if used_plan != "query":  # planned as search_page plans it
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    raw = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + str(compiled), compiled.construct_params()).scalar()
    conn.exec_driver_sql("RESET enable_seqscan")
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    nodes = list(_plan_nodes(plan))
    # (a Bitmap Index Scan node names its index but not its table)
    used = sorted({n["Index Name"] for n in nodes if n.get("Index Name", "").startswith(ARTIFACT_INDEX_NAMES)
                   or (n.get("Relation Name") == "artifacts" and "Index Name" in n)})
    seq = any(n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "artifacts" for n in nodes)
    return {"plan": used_plan, "indexes": used, "seq_scan": seq}


def run_queries(url: str, facts: dict, repeat: int, rng: random.Random, only: list[str] | None = None) -> list[dict]:
    from quantyard import catalog
    from quantyard.catalog.search import search_artifacts

    engine = catalog.make_engine(url)
    factory = catalog.make_session_factory(engine)
    results = []
    with factory() as s:
        for label, params in queries(facts, rng):
            if only and not any(part in label for part in only):
                continue
            first, cursor = search_artifacts(s, limit=50, **params)
            plans = {"first": explain(s, params, None), "next": explain(s, params, cursor) if cursor else None}
            timings = {"first": [], "next": []}
            for i in range(repeat + 2):
                for page, cur in (("first", None), ("next", cursor)):
                    if page == "next" and cursor is None:
                        continue
                    s.expunge_all()
                    t = time.perf_counter()
                    search_artifacts(s, limit=50, cursor=cur, **params)
                    elapsed = (time.perf_counter() - t) * 1000
                    if i >= 2:  # two warm-up runs
                        timings[page].append(elapsed)
            results.append({"query": label, "rows": len(first), "has_next": cursor is not None,
                            "first": _stats(timings["first"]), "next": _stats(timings["next"]), "plans": plans})
    engine.dispose()
    return results


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"p50_ms": round(statistics.median(ordered), 2), "p95_ms": round(p95, 2), "n": len(values)}


def print_table(results: list[dict], target_ms: float) -> None:
    print("| query | rows | first p50 ms | first p95 ms | next p50 ms | next p95 ms | index (first page) | seq scan |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        nxt = r["next"] or {"p50_ms": "-", "p95_ms": "-"}
        seq = r["plans"]["first"]["seq_scan"] or bool(r["plans"]["next"] and r["plans"]["next"]["seq_scan"])
        first = r["plans"]["first"]
        idx = ", ".join(i.removeprefix("ix_artifacts_") for i in first["indexes"]) or "NONE"
        idx = idx if first.get("plan", "query") == "query" else f"{first['plan']}: {idx}"
        print(f"| {r['query']} | {r['rows']} | {r['first']['p50_ms']} | {r['first']['p95_ms']} | {nxt['p50_ms']} | "
              f"{nxt['p95_ms']} | {idx} | {'YES' if seq else 'no'} |")
    worst = max(max(r["first"]["p95_ms"], (r["next"] or {"p95_ms": 0})["p95_ms"]) for r in results)
    print(f"\nworst p95: {worst:.2f} ms (target < {target_ms:g} ms): {'OK' if worst < target_ms else 'OVER'}")


def reuse_facts(url: str, rows: int, rng: random.Random) -> dict:
    """Facts of a database kept by an earlier run (same --rows and --seed), after upgrading it to
    the current migrations; refuses a database that holds another number of artifacts."""
    import psycopg

    from quantyard import catalog

    catalog.upgrade_database(url)
    with psycopg.connect(_pg(url)) as conn:
        count = conn.execute("SELECT count(*) FROM artifacts").fetchone()[0]
    if count != rows:
        raise SystemExit(f"--reuse: {url} holds {count:,} artifacts, not --rows {rows:,} (seeded with other "
                         "--rows/--seed?)")
    orgs, sources, jobs = plan_rows(rows, rng)
    return {"orgs": orgs, "sources": sources, "jobs": len(jobs)}


def analyze(url: str) -> float:
    """ANALYZE again: a new random sample, as a fresh seeding would draw (plans can differ)."""
    import psycopg

    t = time.perf_counter()
    with psycopg.connect(_pg(url), autocommit=True) as conn:
        conn.execute("ANALYZE artifacts")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per page (after 2 warm-up runs)")
    ap.add_argument("--pg-admin-url", default=None, help=f"default: QUANTYARD_TEST_PG_ADMIN_URL or {DEFAULT_ADMIN_URL}")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="leave the database (its URL is printed)")
    ap.add_argument("--reuse", metavar="URL", help="time the queries on a database kept by --keep (same --rows and "
                    "--seed; upgraded to the current migrations first; never dropped)")
    ap.add_argument("--analyze", action="store_true", help="with --reuse: ANALYZE artifacts first (new statistics)")
    ap.add_argument("--only", action="append", metavar="TEXT", help="time only the queries whose label contains "
                    "TEXT (repeatable), e.g. --only text:")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--target-ms", type=float, default=50.0)
    args = ap.parse_args(argv)
    import os

    from quantyard import catalog

    admin = args.pg_admin_url or os.environ.get("QUANTYARD_TEST_PG_ADMIN_URL", DEFAULT_ADMIN_URL)
    rng = random.Random(args.seed)
    if args.reuse:
        facts = reuse_facts(args.reuse, args.rows, rng)
        seed_s = {"reused": args.reuse}
        if args.analyze:
            seed_s["analyze"] = analyze(args.reuse)
        print(f"reusing {args.reuse} ({args.rows:,} artifacts){' after a new ANALYZE' if args.analyze else ''}")
        _time_and_report(args, args.reuse, facts, seed_s, rng)
        return 0
    name, url = create_database(admin)
    try:
        t = time.perf_counter()
        catalog.upgrade_database(url)
        migrate_s = time.perf_counter() - t
        facts = seed(url, args.rows, rng)
        print(f"seeded {args.rows:,} artifacts, {len(facts['sources']):,} sources, {facts['jobs']:,} jobs in "
              f"{len(facts['orgs'])} organisations: migrate {migrate_s:.1f} s, COPY {facts['copy_s']:.1f} s, "
              f"indexes {facts['index_s']:.1f} s, VACUUM ANALYZE {facts['vacuum_analyze_s']:.1f} s")
        seed_s = {"migrate": migrate_s, "copy": facts["copy_s"], "indexes": facts["index_s"],
                  "vacuum_analyze": facts["vacuum_analyze_s"]}
        _time_and_report(args, url, facts, seed_s, rng)
    finally:
        if args.keep:
            print(f"kept database: {url}")
        else:
            drop_database(admin, name)
    return 0


def _time_and_report(args, url: str, facts: dict, seed_s: dict, rng: random.Random) -> None:
    results = run_queries(url, facts, args.repeat, rng, args.only)
    print(f"\n{args.repeat} timed runs per page (limit 50) through quantyard.catalog.search_artifacts:\n")
    print_table(results, args.target_ms)
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": args.rows, "repeat": args.repeat, "seed_s": seed_s,
                                             "results": results}, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
