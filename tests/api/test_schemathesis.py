"""schemathesis over the API's own OpenAPI schema, with a key of each role (viewer, submitter,
maintainer, admin): no server error, and every answer conforms to the schema (its status is
documented, its content type, headers and body match). In-process (ASGI), deterministic, a
bounded number of examples per operation; ``scripts/schemathesis.sh`` runs many more.

Three passes per operation and role: schema-valid inputs (random ids), schema-valid inputs on
real resources of the caller's organisation (a source, a job, an artifact with bytes, a spare
key), and schema-violating inputs, which must also be refused (negative_data_rejection).

QUANTYARD_SCHEMATHESIS_EXAMPLES scales the examples (default 1: about a minute here)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402
from schemathesis.specs.openapi import checks as oa  # noqa: E402

from quantyard import catalog  # noqa: E402
from quantyard.catalog.models import DEFAULT_ORGANIZATION_ID  # noqa: E402
from tests.api.conftest import build_client, make_key, make_settings  # noqa: E402

ROLES = ("viewer", "submitter", "maintainer", "admin")
SCALE = float(os.environ.get("QUANTYARD_SCHEMATHESIS_EXAMPLES", "1"))
CONFORMANCE = [st_checks.not_a_server_error, oa.status_code_conformance, oa.content_type_conformance,
               oa.response_headers_conformance, oa.response_schema_conformance, oa.ignored_auth]
PASSES = {  # name: (generation mode, examples per operation, use real ids, extra checks)
    "positive": (GenerationMode.POSITIVE, 12, False, []),
    "seeded": (GenerationMode.POSITIVE, 8, True, []),
    "negative": (GenerationMode.NEGATIVE, 10, False, [oa.negative_data_rejection]),
}
# Operations whose schema-violating inputs cannot be told apart by the server: the probes
# carry no parameters, and an upload's body is bytes whatever they are.
NEGATIVE_SKIP = {"GET /healthz", "GET /readyz"}


def seed(app, settings) -> dict[str, str]:
    """Real resources of the default organisation (the keys' own): ids for path parameters."""
    store = app.state.store
    data = b"GGUF" + os.urandom(64)
    digest = hashlib.sha256(data).hexdigest()
    tmp = Path(settings.data_dir) / "seed.bin"
    tmp.write_bytes(data)
    stored = store.put_file(f"artifacts/test/{digest}/m.gguf", tmp)
    org = catalog.RequestInfo(organization_id=DEFAULT_ORGANIZATION_ID)
    with app.state.session_factory.begin() as s:
        src = catalog.create_source(s, name="seeded", sha256=digest, size_bytes=len(data), uri=stored.uri,
                                    storage_key=stored.key, architecture="LlamaForCausalLM", actor="seed",
                                    request=org)
        job = catalog.create_job(s, source_id=src.id, targets=["gguf:Q8_0"], actor="seed", request=org)
        art = catalog.record_artifact(
            s, job_id=job.id, target_id=job.targets[0].id, source_id=src.id, format="gguf", quantization="Q8_0",
            sha256=stored.sha256, size_bytes=stored.size_bytes, uri=stored.uri, storage_key=stored.key,
            filename="m.gguf", metrics={"mean_kl": 0.01}, metadata={}, engine_version="t", recipe={},
            recipe_hash=digest)
        spare, _ = catalog.create_api_key(s, organization_id=DEFAULT_ORGANIZATION_ID, name="spare", role="viewer",
                                          actor="seed")
        return {"source_id": src.id, "job_id": job.id, "artifact_id": art.id, "key_id": spare.id}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("schemathesis") / "data")
    with build_client(settings) as client:
        secrets = {role: make_key(settings, role=role, name=f"st-{role}")[1] for role in ROLES}
        schema = schemathesis.openapi.from_asgi("/openapi.json", client.app,
                                                headers={"Authorization": f"Bearer {secrets['admin']}"})
        yield schema, secrets, seed(client.app, settings)


def run_pass(schema, secrets: dict, ids: dict, name: str) -> tuple[Counter, Counter, dict]:
    """Every operation x role: (statuses answered, failures by (operation, role, kind), the first
    failure of each kind)."""
    mode, examples, seeded, extra = PASSES[name]
    statuses: Counter = Counter()
    failures: Counter = Counter()
    first: dict = {}

    def record(key, exc) -> None:
        failures[key] += 1
        first.setdefault(key, str(exc)[:2000])

    def property_of(op, strategy):
        @settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(strategy)
        def check(case):
            for role, secret in secrets.items():
                try:
                    response = case.call_and_validate(headers={"Authorization": f"Bearer {secret}"},
                                                      checks=CONFORMANCE + extra)
                    statuses[response.status_code] += 1
                except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis' Failure(Group)
                    record((op.label, role, type(exc).__name__), exc)
        return check

    for result in schema.get_all_operations():
        op = result.ok()
        if mode is GenerationMode.NEGATIVE and op.label in NEGATIVE_SKIP:
            continue
        path_ids = {p.name: ids[p.name] for p in op.path_parameters if p.name in ids} if seeded else None
        if seeded and not path_ids:
            continue
        try:
            property_of(op, op.as_strategy(generation_mode=mode, path_parameters=path_ids))()
        except Exception as exc:  # noqa: BLE001 - e.g. hypothesis finding no input at all: report it
            record((op.label, "-", type(exc).__name__), exc)
    return statuses, failures, first


@pytest.mark.parametrize("name", list(PASSES))
def test_schemathesis_finds_nothing(world, name):
    schema, secrets, ids = world
    statuses, failures, first = run_pass(schema, secrets, ids, name)
    print(f"schemathesis {name}: {sum(statuses.values())} calls passed, {sum(failures.values())} failed; "
          f"statuses {dict(sorted(statuses.items()))}")
    report = "\n\n".join(f"{k} x{failures[k]}:\n{first[k]}" for k in failures)
    assert not failures, report
    assert sum(statuses.values()) > 400  # it ran: every operation, every role
    if name != "negative":  # the inputs reached the routes, not only the validation
        assert sum(n for status, n in statuses.items() if status < 300) > 50, statuses
