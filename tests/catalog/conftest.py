"""Shared helpers for catalog tests: a session factory on a fresh migrated catalog (SQLite and Postgres)."""

from __future__ import annotations

import pytest

from quantyard import catalog


@pytest.fixture
def engine(catalog_url):
    eng = catalog.make_engine(catalog_url)
    yield eng
    eng.dispose()


@pytest.fixture
def factory(engine):
    return catalog.make_session_factory(engine)


@pytest.fixture
def source(factory):
    with factory.begin() as s:
        return catalog.create_source(
            s, name="tiny-llama", sha256="a" * 64, size_bytes=1234, uri="file:///x/sources/a/tiny.tar",
            storage_key="sources/a/tiny.tar", architecture="LlamaForCausalLM", metadata={"dtype": "float32"},
            actor="key:test",
        )


@pytest.fixture
def make_job(factory, source):
    def make(targets=("gguf:Q8_0",), labels=None, hardware_class="cpu"):
        with factory.begin() as s:
            return catalog.create_job(
                s, source_id=source.id, targets=list(targets), hardware_class=hardware_class,
                labels=labels or {}, actor="key:test", request=catalog.RequestInfo("req-1", "10.0.0.1", "pytest"),
            )

    return make
