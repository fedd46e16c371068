"""Catalog search (quantyard/catalog/search.py) on SQLite and Postgres: every filter, combinations,
the three sorts walked page by page (also with inserts between pages), bad values, and the
migration's backfill of artifacts recorded before revision 0006."""

from __future__ import annotations

import hashlib
import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from quantyard import catalog
from quantyard.catalog import InvalidArgument, InvalidCursor
from quantyard.catalog.search import org_token_prefix, search_artifacts, search_tokens

T0 = datetime(2026, 3, 1, tzinfo=UTC)
_serial = itertools.count()


def _source(s, name, architecture, org="org_a"):
    digest = hashlib.sha256(name.encode()).hexdigest()
    return catalog.create_source(s, name=name, sha256=digest, size_bytes=10, uri=f"file:///{name}",
                                 storage_key=f"sources/{name}", architecture=architecture, actor="key:test",
                                 organization_id=org)


def _artifact(s, source, job, *, fmt="gguf", quant="Q8_0", size=1000, at=None, metrics=None):
    n = next(_serial)
    art = catalog.record_artifact(
        s, job_id=job.id if job else None, target_id=None, source_id=source.id, format=fmt, quantization=quant,
        sha256=hashlib.sha256(f"art{n}".encode()).hexdigest(), size_bytes=size, uri=f"file:///a{n}",
        storage_key=f"artifacts/{n}", filename=f"{source.name}-{quant}.{fmt}", metrics=metrics or {},
        metadata={}, engine_version="test", recipe={}, recipe_hash=f"{n:064d}")
    if at is not None:
        art.created_at = at
    s.flush()
    return art


@pytest.fixture
def corpus(factory):
    """12 artifacts of two organisations; ``ids[name]`` by a readable name."""
    with factory.begin() as s:
        llama = _source(s, "Acme-Llama-7B", "LlamaForCausalLM")
        bert = _source(s, "minilm-l6", "BertModel")
        other = _source(s, "Acme-Llama-7B", "LlamaForCausalLM", org="org_b")
        nlp = catalog.create_job(s, source_id=llama.id, targets=["gguf:Q8_0"], labels={"team": "nlp", "env": "prod"},
                                 actor="key:test")
        dev = catalog.create_job(s, source_id=llama.id, targets=["gguf:Q4_K_M"], labels={"team": "nlp", "env": "dev"},
                                 actor="key:test")
        emb = catalog.create_job(s, source_id=bert.id, targets=["onnx:int8-dynamic"], labels={"team": "search"},
                                 actor="key:test")
        foreign = catalog.create_job(s, source_id=other.id, targets=["gguf:Q8_0"], labels={"team": "nlp"},
                                     actor="key:test")
        spec = {
            "q8_old": (llama, nlp, "gguf", "Q8_0", 7_000, 0, {"mean_kl": 0.002, "top1_agreement": 0.98,
                                                           "bits_per_weight": 8.5}),
            "q8_new": (llama, nlp, "gguf", "Q8_0", 7_100, 10, {"mean_kl": 0.003, "top1_agreement": 0.97,
                                                            "bits_per_weight": 8.5}),
            "q4": (llama, dev, "gguf", "Q4_K_M", 4_000, 20, {"mean_kl": 0.04, "top1_agreement": 0.91,
                                                          "bits_per_weight": 4.9}),
            "q2": (llama, dev, "gguf", "Q2_K", 2_500, 30, {"mean_kl": 0.3, "top1_agreement": 0.6,
                                                        "bits_per_weight": 2.9}),
            "f16": (llama, None, "gguf", "F16", 13_000, 40, {"mean_kl": 0.0001, "top1_agreement": 1.0,
                                                          "bits_per_weight": 16.0}),
            "onnx_fp32": (bert, emb, "onnx", "fp32", 90_000, 50, {"cosine_min": 0.99999}),
            "onnx_int8": (bert, emb, "onnx", "int8-dynamic", 23_000, 60, {"cosine_min": 0.995}),
            "onnx_int4": (bert, emb, "onnx", "int4", 12_000, 70, {"cosine_min": 0.9}),
            "bad_metric": (bert, emb, "onnx", "fp16", 45_000, 80, {"cosine_min": "n/a", "mean_kl": None}),
            "same_size_a": (llama, dev, "gguf", "Q5_K_M", 5_000, 90, {"mean_kl": 0.01}),
            "same_size_b": (llama, dev, "gguf", "Q5_K_S", 5_000, 90, {"mean_kl": 0.01}),
            "foreign": (other, foreign, "gguf", "Q8_0", 7_000, 100, {"mean_kl": 0.002}),
        }
        ids = {}
        for name, (src, job, fmt, quant, size, minutes, metrics) in spec.items():
            art = _artifact(s, src, job, fmt=fmt, quant=quant, size=size, at=T0 + timedelta(minutes=minutes),
                            metrics=metrics)
            ids[name] = art.id
        sha = {art_id: s.get(catalog.Artifact, art_id).sha256 for art_id in ids.values()}
    return {"ids": ids, "llama": llama.id, "bert": bert.id, "sha": sha}


def _names(corpus, items):
    back = {v: k for k, v in corpus["ids"].items()}
    return [back[a.id] for a in items]


def _find(factory, corpus, **kw):
    kw.setdefault("organization_id", "org_a")
    with factory() as s:
        items, _ = search_artifacts(s, limit=500, **kw)
        return _names(corpus, items)


NEWEST_FIRST_A = ["same_size_b", "same_size_a", "bad_metric", "onnx_int4", "onnx_int8", "onnx_fp32", "f16", "q2",
                  "q4", "q8_new", "q8_old"]


def test_organisation_scope_and_default_order(factory, corpus):
    got = _find(factory, corpus)
    # same created_at: id breaks the tie (descending)
    tie = sorted(["same_size_a", "same_size_b"], key=lambda n: corpus["ids"][n], reverse=True)
    assert got == tie + NEWEST_FIRST_A[2:]
    assert _find(factory, corpus, organization_id="org_b") == ["foreign"]
    assert len(_find(factory, corpus, organization_id=None)) == 12
    assert _find(factory, corpus, organization_id="org_nobody") == []


@pytest.mark.parametrize(("filters", "expected"), [
    ({"format": "ONNX"}, {"onnx_fp32", "onnx_int8", "onnx_int4", "bad_metric"}),
    ({"quantization": "q8_0"}, {"q8_old", "q8_new"}),
    ({"quantization": "INT8-DYNAMIC"}, {"onnx_int8"}),
    ({"architecture": "BertModel"}, {"onnx_fp32", "onnx_int8", "onnx_int4", "bad_metric"}),
    ({"label": "team=nlp"}, {"q8_old", "q8_new", "q4", "q2", "same_size_a", "same_size_b"}),
    ({"label": ["team=nlp", "env=prod"]}, {"q8_old", "q8_new"}),
    ({"label": {"env": "dev"}}, {"q4", "q2", "same_size_a", "same_size_b"}),
    ({"label": "team=nobody"}, set()),
    ({"min_size": 12_000}, {"f16", "onnx_fp32", "onnx_int8", "onnx_int4", "bad_metric"}),
    ({"max_size": 5_000}, {"q4", "q2", "same_size_a", "same_size_b"}),
    ({"min_size": "5000", "max_size": "7000"}, {"q8_old", "same_size_a", "same_size_b"}),
    ({"created_after": T0 + timedelta(minutes=60)}, {"onnx_int8", "onnx_int4", "bad_metric", "same_size_a",
                                                   "same_size_b"}),
    ({"created_before": "2026-03-01T00:20:00Z"}, {"q8_old", "q8_new"}),
    ({"created_after": "2026-03-01T00:10:00", "created_before": "2026-03-01T01:15:00+01:00"}, {"q8_new"}),
    ({"created_after": "2026-03-01T00:10:00", "created_before": "2026-03-01T00:30:00+00:00"}, {"q8_new", "q4"}),
    ({"max_mean_kl": 0.01}, {"q8_old", "q8_new", "f16", "same_size_a", "same_size_b"}),
    ({"max_mean_kl": "0.05", "min_top1": "0.95"}, {"q8_old", "q8_new", "f16"}),
    ({"min_top1": 0.9}, {"q8_old", "q8_new", "q4", "f16"}),
    ({"min_cosine": 0.99}, {"onnx_fp32", "onnx_int8"}),
    ({"max_bits_per_weight": 5}, {"q4", "q2"}),
    ({"q": "LLAMA"}, {"q8_old", "q8_new", "q4", "q2", "f16", "same_size_a", "same_size_b"}),
    ({"q": "minilm"}, {"onnx_fp32", "onnx_int8", "onnx_int4", "bad_metric"}),
    ({"q": "q5_k"}, {"same_size_a", "same_size_b"}),
    ({"q": "int4"}, {"onnx_int4"}),
    ({"q": "100%"}, set()),
    ({"q": "l_ama"}, set()),
    ({"source_id": "llama"}, {"q8_old", "q8_new", "q4", "q2", "f16", "same_size_a", "same_size_b"}),
    # combinations
    ({"format": "gguf", "quantization": "Q8_0", "label": "env=prod", "max_mean_kl": 0.0025}, {"q8_old"}),
    ({"architecture": "LlamaForCausalLM", "max_mean_kl": 0.05, "min_size": 4_500}, {"q8_old", "q8_new", "f16",
                                                                                     "same_size_a", "same_size_b"}),
    ({"q": "acme", "label": "team=nlp", "max_size": 4_000, "created_after": "2026-03-01T00:25:00Z"}, {"q2"}),
])
def test_filters(factory, corpus, filters, expected):
    if filters.get("source_id") in ("llama", "bert"):
        filters = {**filters, "source_id": corpus[filters["source_id"]]}
    assert set(_find(factory, corpus, **filters)) == expected


def test_sha256_prefix(factory, corpus):
    target = corpus["ids"]["q4"]
    prefix = corpus["sha"][target][:10]
    assert _find(factory, corpus, q=prefix.upper()) == ["q4"]
    assert _find(factory, corpus, q=corpus["sha"][target]) == ["q4"]


def test_metric_columns_ignore_non_numbers(factory, corpus):
    with factory() as s:
        art = s.get(catalog.Artifact, corpus["ids"]["bad_metric"])
        assert art.cosine_min is None and art.mean_kl is None and art.metrics["cosine_min"] == "n/a"
        q4 = s.get(catalog.Artifact, corpus["ids"]["q4"])
        assert (q4.mean_kl, q4.top1_agreement, q4.bits_per_weight, q4.architecture) == (
            0.04, 0.91, 4.9, "LlamaForCausalLM")
        assert q4.label_pairs == ["env=dev", "team=nlp"]


def _walk(factory, limit, **kw):
    pages, cursor = [], None
    with factory() as s:
        while True:
            items, cursor = search_artifacts(s, organization_id="org_a", limit=limit, cursor=cursor, **kw)
            pages.append([a.id for a in items])
            if cursor is None:
                return pages


@pytest.mark.parametrize("sort", ["created", "size", "mean_kl"])
def test_pages_concatenate_to_the_full_ordered_list(factory, corpus, sort):
    with factory() as s:
        full = [a.id for a in search_artifacts(s, organization_id="org_a", sort=sort, limit=500)[0]]
        rows = {a: s.get(catalog.Artifact, a) for a in full}
    pages = _walk(factory, 3, sort=sort)
    assert [i for p in pages for i in p] == full
    assert all(len(p) == 3 for p in pages[:-1]) and 1 <= len(pages[-1]) <= 3
    if sort == "size":
        keys = [(rows[a].size_bytes, a) for a in full]
        assert keys == sorted(keys)
    elif sort == "mean_kl":
        assert len(full) == 7  # only artifacts with a KL
        keys = [(rows[a].mean_kl, a) for a in full]
        assert keys == sorted(keys)
    else:
        keys = [(rows[a].created_at, a) for a in full]
        assert keys == sorted(keys, reverse=True)


@pytest.mark.parametrize("sort", ["created", "size"])
def test_pages_stable_under_inserts(factory, corpus, sort):
    """New artifacts recorded between pages never make a page repeat or skip an earlier row."""
    with factory() as s:
        before = [a.id for a in search_artifacts(s, organization_id="org_a", sort=sort, limit=500)[0]]
    seen, cursor, inserted = [], None, []
    while True:
        with factory() as s:
            items, cursor = search_artifacts(s, organization_id="org_a", sort=sort, limit=4, cursor=cursor)
        seen += [a.id for a in items]
        if cursor is None:
            break
        with factory.begin() as s:  # a new one, newest and of a size in the middle of the range
            src = s.get(catalog.Source, corpus["llama"])
            inserted.append(_artifact(s, src, None, quant="Q6_K", size=6_000).id)
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in set(before)] == before


def test_cursor_keeps_filters_and_rejects_other_sorts(factory, corpus):
    with factory() as s:
        page, cursor = search_artifacts(s, organization_id="org_a", label="team=nlp", limit=4)
        rest, end = search_artifacts(s, organization_id="org_a", label="team=nlp", limit=4, cursor=cursor)
        assert end is None and len(page) == 4 and len(rest) == 2
        with pytest.raises(InvalidCursor, match="sort=size"):
            search_artifacts(s, organization_id="org_a", sort="size", cursor=cursor)
        with pytest.raises(InvalidCursor):
            search_artifacts(s, cursor="not-a-cursor")


@pytest.mark.parametrize(("filters", "names"), [
    ({"min_size": -1}, "min_size"),
    ({"max_size": "ten"}, "max_size"),
    ({"min_size": 10, "max_size": 5}, "min_size"),
    ({"created_after": "yesterday"}, "created_after"),
    ({"created_before": "2026-13-01"}, "created_before"),
    ({"created_after": "2026-03-02", "created_before": "2026-03-01"}, "created_after"),
    ({"max_mean_kl": "nan"}, "max_mean_kl"),
    ({"max_mean_kl": "inf"}, "max_mean_kl"),
    ({"min_top1": 1.5}, "min_top1"),
    ({"min_cosine": "high"}, "min_cosine"),
    ({"max_bits_per_weight": -4}, "max_bits_per_weight"),
    ({"label": "team"}, "label"),
    ({"label": "=nlp"}, "label"),
    ({"sort": "name"}, "sort"),
])
def test_bad_values_name_the_parameter(factory, corpus, filters, names):
    with factory() as s, pytest.raises(InvalidArgument, match=names):
        search_artifacts(s, **filters)


def test_list_artifacts_delegates(factory, corpus):
    with factory() as s:
        items, _ = catalog.list_artifacts(s, organization_id="org_a", quantization="q4_k_m")
    assert _names(corpus, items) == ["q4"]


def test_withdrawn_and_deleted_hidden_unless_asked(factory, corpus):
    with factory.begin() as s:
        s.get(catalog.Artifact, corpus["ids"]["q4"]).withdrawn_at = T0
        s.get(catalog.Artifact, corpus["ids"]["q2"]).deleted_at = T0
    assert set(_find(factory, corpus, label="env=dev")) == {"same_size_a", "same_size_b"}
    assert set(_find(factory, corpus, label="env=dev", include_withdrawn=True)) == {"same_size_a", "same_size_b", "q4"}
    assert set(_find(factory, corpus, label="env=dev", include_deleted=True)) == {"same_size_a", "same_size_b", "q2"}


def _artifact_indexes(url: str) -> dict[str, tuple]:
    """{name: (columns, unique, dialect options)} of the artifacts table's indexes."""
    from sqlalchemy import inspect

    engine = catalog.make_engine(url)
    try:
        found = inspect(engine).get_indexes("artifacts")
    finally:
        engine.dispose()
    return {i["name"]: (tuple(i["column_names"]), i["unique"], repr(sorted(i.get("dialect_options", {}).items())))
            for i in found}


def test_migration_fills_columns_of_existing_artifacts(catalog_url, tmp_path):
    """Artifacts recorded before 0006 get their search columns from the upgrade (0007: tokens with
    their organisation's prefix; its downgrade strips it)."""
    if catalog_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        from tests.fixtures.services import (
            _pg_url_for,
            create_pg_database,
            drop_pg_database,
        )

        name = create_pg_database("quantyard_search_mig")
        url = _pg_url_for(name)
    try:
        catalog.upgrade_database(url, "0005")
        engine = catalog.make_engine(url)
        labels = '{"team": "nlp", "env": "prod"}'
        metrics = '{"mean_kl": 0.02, "top1_agreement": 0.95, "cosine_min": "x", "bits_per_weight": 4}'
        now = "2026-03-01 00:00:00"
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO sources (id, name, sha256, size_bytes, uri, storage_key, architecture, metadata, "
                f"created_at) VALUES ('src_1', 'Acme-Llama', 'aa', 1, 'u', 'k', 'LlamaForCausalLM', '{{}}', '{now}')"))
            conn.execute(text(
                "INSERT INTO jobs (id, source_id, status, progress, hardware_class, labels, attempts, max_attempts, "
                f"cancel_requested, warnings, created_at) VALUES ('job_1', 'src_1', 'succeeded', 1, 'cpu', '{labels}', "
                f"1, 3, false, '[]', '{now}')"))
            for id_, org in (("art_1", "'org_a'"), ("art_2", "NULL")):
                conn.execute(text(
                    "INSERT INTO artifacts (id, organization_id, job_id, source_id, format, quantization, filename, "
                    f"sha256, size_bytes, uri, storage_key, metrics, metadata, engine_version, recipe_hash, created_at) "
                    f"VALUES ('{id_}', {org}, 'job_1', 'src_1', 'gguf', 'Q4_K_M', 'Model-Q4_K_M.gguf', 'bb', 5, 'u', "
                    f"'k', '{metrics}', '{{}}', 'e', 'r', '{now}')"))
        engine.dispose()
        catalog.upgrade_database(url, "0006")
        indexes_0006 = _artifact_indexes(url)
        catalog.upgrade_database(url)
        # 0007 rebuilds the indexes it drops for the rewrite (Postgres), each from its definition
        assert _artifact_indexes(url) == indexes_0006
        engine = catalog.make_engine(url)
        with catalog.make_session_factory(engine)() as s:
            art = s.get(catalog.Artifact, "art_1")
            assert art.architecture == "LlamaForCausalLM"
            assert sorted(art.label_pairs) == ["env=prod", "team=nlp"]
            assert art.search_text == "model-q4_k_m.gguf acme-llama gguf q4_k_m"
            # the migrations' SQL (Postgres) / Python (SQLite) split and org prefix (0006, 0007)
            # match catalog.search.search_tokens
            assert sorted(art.search_tokens) == search_tokens(art.search_text, organization_id="org_a")
            prefix = org_token_prefix("org_a")
            assert {prefix + t for t in ("=acme", ">llama", "<q4", "=gguf")} <= set(art.search_tokens)
            assert sorted(s.get(catalog.Artifact, "art_2").search_tokens) == search_tokens(art.search_text)
            assert (art.mean_kl, art.top1_agreement, art.cosine_min, art.bits_per_weight) == (0.02, 0.95, None, 4.0)
            found = search_artifacts(s, label="team=nlp", max_mean_kl=0.05, q="acme")[0]
            assert sorted(a.id for a in found) == ["art_1", "art_2"]
            found = search_artifacts(s, organization_id="org_a", q="model-q4_k_m.gguf acme-llama")[0]
            assert [a.id for a in found] == ["art_1"]
        engine.dispose()
        # 0007's downgrade takes the organisation prefixes off again
        from alembic import command

        from quantyard.catalog.db import alembic_config

        command.downgrade(alembic_config(url), "0006")
        engine = catalog.make_engine(url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, search_text, search_tokens FROM artifacts ORDER BY id")).all()
        engine.dispose()
        for id_, text_, tokens in rows:
            tokens = json.loads(tokens) if isinstance(tokens, str) else tokens
            assert sorted(tokens) == search_tokens(text_), id_
        assert _artifact_indexes(url) == indexes_0006
    finally:
        if not catalog_url.startswith("sqlite"):
            drop_pg_database(name)


# ----------------------------------------------------------------- free text: token index path

WORDY = ["Acme-Llama-7B", "tinyllama-1.1b-chat-v4", "llama-0.1b-instruct-v4", "llama-0.1b-instruct-v42",
         "gemma-2b_it.v1", "Qwen2.5-0.5B-Instruct"]
FREE_TEXT = ["llama-0.1b-instruct-v4", "llama-0.1b", "instruct-v4", "-v4", "a-0.1", "0.1b", "ma-7b", "q4_k_m",
             "-q8_0.gguf", "2.5-0.5b-inst", "instruct", "llama", "b_it.v", "v42-", "it.v1-q8_0.gguf gguf q8_0",
             "lama-1.1b-chat-v4-q4", "7b-", "--", "ruct-v4-q4_k_m.gg", "-"]


@pytest.fixture
def wordy(factory):
    """Sources whose names share words, prefixes and suffixes, each with a Q8_0 and a Q4_K_M."""
    with factory.begin() as s:
        arts = []
        for name in WORDY:
            src = _source(s, name, "LlamaForCausalLM")
            for quant in ("Q8_0", "Q4_K_M"):
                arts.append(_artifact(s, src, None, quant=quant))
        return {a.id: a.search_text for a in arts}


@pytest.mark.parametrize("q", FREE_TEXT)
def test_free_text_is_a_substring_match(factory, wordy, q):
    """Whole words, word ends/starts (token index on Postgres) and infixes (trigram) return exactly
    the rows whose search text contains ``q``, as a plain substring test over every row says."""
    expected = {id_ for id_, text_ in wordy.items() if q in text_}
    with factory() as s:
        got, _ = search_artifacts(s, organization_id="org_a", q=q, limit=500)
    assert {a.id for a in got} == expected
    if q in ("llama-0.1b-instruct-v4", "instruct-v4", "llama"):
        assert len(expected) > 2  # the corpus makes these match several sources' rows


def test_query_tokens_are_a_subset_of_every_matching_rows_tokens():
    """The necessary condition behind the token path, over random texts and their substrings."""
    import random

    from quantyard.catalog.search import query_tokens

    rng = random.Random(7)
    alphabet = "ab1-._ xyzq"
    for _ in range(3000):
        text_ = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        i = rng.randrange(len(text_))
        q = text_[i:rng.randint(i + 1, len(text_))]
        assert set(query_tokens(q)) <= set(search_tokens(text_)), (text_, q)
    assert query_tokens("llama-0.1b-instruct-v4") == ["<v4", "=0", "=1b", "=instruct", ">llama"]
    assert query_tokens("instruct") == [] and query_tokens("0a1b2c3d4e5f") == []


# ------------------------------------------------- free text on Postgres: walk, then text index


def _walk_all(factory, q, sort, limit):
    """Every page of ``q`` (org_a, ``sort``) through search_page; the ids in order and the plans."""
    from quantyard.catalog.search import make_filters, search_page

    ids, plans, cursor = [], set(), None
    f = make_filters(organization_id="org_a", q=q)
    while True:
        with factory() as s:
            page, plan = search_page(s, f, sort=sort, cursor=cursor, limit=limit)
            plans.add(plan)
            items, cursor = page[:limit], None
            if len(page) > limit:
                from quantyard.catalog.search import _sort, encode_cursor

                cursor = encode_cursor(_sort(sort), items[-1])
            ids += [a.id for a in items]
        if cursor is None:
            return ids, plans


@pytest.mark.parametrize("sort", ["created", "size", "mean_kl"])
def test_free_text_walk_and_text_index_pages(factory, wordy, monkeypatch, sort):
    """With a tiny walk (1 row per page row), pages come from the bounded page-order walk when the
    text is common and from the text index when it is rare; either way the pages concatenate to
    the unfiltered order restricted to rows containing ``q`` (a Python substring test)."""
    from quantyard.catalog import search

    monkeypatch.setattr(search, "WALK_ROWS_PER_ROW", 1)
    with factory.begin() as s:  # distinct sizes and KLs, some shared, so every sort has ties to break
        for n, art_id in enumerate(sorted(wordy)):
            art = s.get(catalog.Artifact, art_id)
            art.size_bytes, art.mean_kl = 1000 + (n % 5), (0.01 * (n % 4)) if n % 6 else None
            art.created_at = T0 + timedelta(minutes=n % 7)
    with factory() as s:
        full, _ = search_artifacts(s, organization_id="org_a", sort=sort, limit=500)
        text_of = {a.id: a.search_text for a in full}
        sha_of = {a.id: a.sha256 for a in full}
        order = [a.id for a in full]
    hex_q = sha_of[order[3]][:9]
    seen_plans = set()
    for q in FREE_TEXT + [hex_q]:
        expected = [i for i in order if q in text_of[i] or (q == hex_q and sha_of[i].startswith(q))]
        for limit in (1, 2, 3):
            got, plans = _walk_all(factory, q, sort, limit)
            assert got == expected, (q, sort, limit, plans)
            seen_plans |= plans
    postgres = factory.kw["bind"].dialect.name == "postgresql"
    assert seen_plans == ({"walk", "text-index"} if postgres else {"query"}), seen_plans


@pytest.mark.parametrize("catalog_url", ["postgres"], indirect=True)  # a Postgres planner setting
def test_free_text_leaves_the_callers_planner_settings(factory, wordy):
    """The walk turns sequential scans off for its own queries only (Postgres)."""
    with factory() as s:
        assert s.get_bind().dialect.name == "postgresql"
        for setting in ("on", "off"):
            s.execute(text(f"SET LOCAL enable_seqscan = {setting}"))
            items, _ = search_artifacts(s, organization_id="org_a", q="llama", limit=2)
            assert items
            assert s.execute(text("SHOW enable_seqscan")).scalar_one() == setting


# ------------------------------------------------ free text: per-organisation tokens, unscoped search


def _two_orgs(factory):
    """org_a and org_b with sources of the same names (their words, prefixes and suffixes shared),
    org_b also one name of its own; ``{id: (organization, search_text)}``."""
    with factory.begin() as s:
        arts = []
        for org, names in (("org_a", WORDY[:4]), ("org_b", WORDY[1:3] + ["granite-70b-base"])):
            for name in names:
                src = _source(s, name, "LlamaForCausalLM", org=org)
                for quant in ("Q8_0", "Q4_K_M"):
                    arts.append(_artifact(s, src, None, quant=quant))
        return {a.id: (a.organization_id, a.search_text) for a in arts}


@pytest.mark.parametrize("prefix_len", [6, 0])  # 0: every organisation's prefix collides
def test_free_text_scoped_and_unscoped_over_two_organisations(factory, monkeypatch, prefix_len):
    """Per-organisation tokens: an org-scoped search reads its own tokens, an unscoped one (no
    organisation: the trigram index) reads every organisation's rows; both return exactly the rows
    a Python substring test picks, also when two organisations' token prefixes collide. Pages come
    from the walk and the text index (a walk of 1 row per page row)."""
    from quantyard.catalog import search

    monkeypatch.setattr(search, "ORG_PREFIX_LEN", prefix_len)
    monkeypatch.setattr(search, "WALK_ROWS_PER_ROW", 1)
    rows = _two_orgs(factory)
    for q in FREE_TEXT + ["granite-70b", "70b-base-q8_0"]:
        for org in ("org_a", "org_b", None):
            expected = {i for i, (o, t) in rows.items() if q in t and org in (None, o)}
            for limit in (2, 500):
                with factory() as s:
                    got, cursor = search_artifacts(s, organization_id=org, q=q, limit=limit)
                    ids = {a.id for a in got}
                    while cursor:
                        got, cursor = search_artifacts(s, organization_id=org, q=q, limit=limit, cursor=cursor)
                        ids |= {a.id for a in got}
                assert ids == expected, (q, org, limit)


def test_tokens_carry_the_organisation_prefix():
    text_ = "llama-0.1b-instruct-v4-q8_0.gguf llama-0.1b-instruct-v4 gguf q8_0"
    prefix = org_token_prefix("org_a")
    assert len(prefix) == 6 and prefix != org_token_prefix("org_b") and org_token_prefix(None) == ""
    assert search_tokens(text_, organization_id="org_a") == sorted(prefix + t for t in search_tokens(text_))
    from quantyard.catalog.search import query_tokens

    assert query_tokens("instruct-v4", organization_id="org_a") == [prefix + "<v4", prefix + ">instruct"]
    # which index an unscoped search may use: never the (per-organisation) tokens
    from sqlalchemy.dialects import postgresql

    from quantyard.catalog.search import _text_match

    def sql(org):
        return str(_text_match("llama-0.1b", "postgresql", organization_id=org).compile(dialect=postgresql.dialect()))

    assert "search_tokens" in sql("org_a") and "search_tokens" not in sql(None)


@pytest.mark.parametrize("catalog_url", ["postgres"], indirect=True)
def test_org_prefix_matches_postgres_md5(factory):
    """Migration 0007 computes the prefix with Postgres' md5(); record_artifact with hashlib."""
    with factory() as s:
        for org in ("org_a", "org_default", "org_ünï"):
            assert s.execute(text("SELECT left(md5(:o), 6)"), {"o": org}).scalar_one() == org_token_prefix(org)
