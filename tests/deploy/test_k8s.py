"""The Kubernetes manifests (k8s/): they render, validate strictly (core kinds against Kubernetes'
own schemas, KEDA and Prometheus Operator objects against their CRD schemas with unknown fields
rejected), and every workload follows the restricted pod security rules, probes and limits."""

from __future__ import annotations

import base64
import copy
import shlex
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest

from quantyard.cli import main as cli_main
from quantyard.engine.manifest import MANIFEST
from quantyard.queue import celery_config, queue_name
from quantyard.settings import Settings
from tests.deploy import render
from tests.deploy.k8s_walk import (
    container_env,
    containers,
    cpu_millis,
    find,
    pod_spec,
    quantity_bytes,
    worker_deployments,
    workloads,
)

K8S_VERSION = "1.37.0"
RENDERS = ("dev", "prod", "base", "base+components")


@pytest.fixture(scope="module")
def crd_schemas():
    return {key: jsonschema.Draft202012Validator(schema) for key, schema in render.crd_schemas().items()}


def _is_crd(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0].endswith((".sh", ".coreos.com"))


@pytest.mark.parametrize("name", RENDERS)
def test_renders_and_core_objects_validate_strictly(renders, name):
    docs = renders[name]
    assert {"Deployment", "Job", "ConfigMap", "ServiceAccount"} <= {d["kind"] for d in docs}
    for doc in docs:
        if not _is_crd(doc):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field(renders):
    api = copy.deepcopy(find(renders["prod"], "Deployment", "quantyard-api"))
    pod_spec(api)["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", RENDERS)
def test_custom_resources_validate_against_their_crd_schemas(renders, crd_schemas, name):
    for doc in filter(_is_crd, renders[name]):
        validator = crd_schemas.get((doc["apiVersion"], doc["kind"]))
        assert validator is not None, f"no schema for {doc['apiVersion']} {doc['kind']}"
        validator.validate(doc)


def test_crd_schemas_reject_unknown_fields(renders, crd_schemas):
    for kind, where in (("ScaledObject", "spec"), ("PrometheusRule", "spec"), ("PodMonitor", "spec")):
        doc = copy.deepcopy(next(d for d in renders["prod"] if d["kind"] == kind))
        doc[where]["coolDownPeriod"] = 1  # a typo: KEDA's field is cooldownPeriod
        with pytest.raises(jsonschema.ValidationError, match="coolDownPeriod"):
            crd_schemas[(doc["apiVersion"], kind)].validate(doc)


def _check_security(where: str, pod: dict[str, Any], c: dict[str, Any]) -> None:
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
    assert csc.get("runAsUser", psc.get("runAsUser", 0)) != 0, where
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault", where
    assert csc.get("allowPrivilegeEscalation") is False, where
    assert csc.get("readOnlyRootFilesystem") is True, where
    assert csc.get("capabilities", {}).get("drop") == ["ALL"] and not csc["capabilities"].get("add"), where
    assert not csc.get("privileged"), where
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where


def _check_resources(where: str, pod: dict[str, Any], c: dict[str, Any]) -> None:
    res = c.get("resources", {})
    requests, limits = res.get("requests", {}), res.get("limits", {})
    for key in ("cpu", "memory", "ephemeral-storage"):
        assert key in requests and key in limits, f"{where}: {key} request and limit"
    assert cpu_millis(requests["cpu"]) <= cpu_millis(limits["cpu"]), where
    for key in ("memory", "ephemeral-storage"):
        assert quantity_bytes(requests[key]) <= quantity_bytes(limits[key]), f"{where}: {key}"
    # Every writable path is a size-limited emptyDir the container's disk limit covers.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    disk = 0
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            assert "sizeLimit" in volume["emptyDir"], f"{where}: emptyDir {mount['name']} has no sizeLimit"
            if volume["emptyDir"].get("medium") != "Memory":
                disk += quantity_bytes(volume["emptyDir"]["sizeLimit"])
        else:
            assert mount.get("readOnly") or "secret" in volume or "configMap" in volume, f"{where}: {mount['name']}"
    assert disk <= quantity_bytes(limits["ephemeral-storage"]), f"{where}: scratch above the ephemeral-storage limit"


@pytest.mark.parametrize("name", RENDERS)
def test_every_container_is_restricted_limited_and_probed(renders, name):
    seen = 0
    for obj in workloads(renders[name]):
        pod = pod_spec(obj)
        assert pod.get("automountServiceAccountToken") is False, obj["metadata"]["name"]
        for c in containers(pod):
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            _check_security(where, pod, c)
            _check_resources(where, pod, c)
            if obj["kind"] != "Job":  # a Job's pod ends by itself
                assert "livenessProbe" in c and "readinessProbe" in c, f"{where}: probes"
            seen += 1
    assert seen >= 3


def _worker_classes(docs):
    return worker_deployments(docs)


def test_every_hardware_class_has_a_worker_consuming_its_queue(renders):
    workers = _worker_classes(renders["prod"])
    assert set(workers) == set(MANIFEST["hardware_classes"])
    for hardware_class, deployment in workers.items():
        (c,) = pod_spec(deployment)["containers"]
        args = c["args"]
        assert args[:1] == ["worker"] and args[args.index("--hardware-class") + 1] == hardware_class
        assert args.count("--hardware-class") == 1  # one class per Deployment, so KEDA scales it alone


def test_worker_probes_are_the_heartbeat_check(renders):
    for hardware_class, deployment in _worker_classes(renders["prod"]).items():
        (c,) = pod_spec(deployment)["containers"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = c[probe]["exec"]["command"]
            assert command == ["quantyard", "worker-check", "--hardware-class", hardware_class], shlex.join(command)
            # the command parses with the real CLI
            sub = cli_main.get_command(click.Context(cli_main), command[1])
            assert sub is not None
            sub.make_context(command[1], command[2:])
            assert c[probe]["timeoutSeconds"] >= 10  # a Python start and one catalog query


def test_worker_grace_period_covers_the_task_time_limit(renders):
    for name in ("dev", "prod"):
        docs = renders[name]
        for hardware_class, deployment in _worker_classes(docs).items():
            pod = pod_spec(deployment)
            (c,) = pod["containers"]
            env = container_env(c, docs)
            settings = Settings(**{k[len("QUANTYARD_"):].lower(): v for k, v in env.items()
                                   if k.startswith("QUANTYARD_") and isinstance(v, str)})
            # SIGTERM = warm shutdown: the running conversion ends (or hits its hard limit)
            # before the kubelet's SIGKILL.
            assert pod["terminationGracePeriodSeconds"] > celery_config(settings)["task_time_limit"], hardware_class
            assert settings.task_time_limit_s < settings.visibility_timeout_s
            volumes = {v["name"]: v for v in pod["volumes"]}
            data_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(settings.data_dir))
            scratch = quantity_bytes(volumes[data_mount["name"]]["emptyDir"]["sizeLimit"])
            assert scratch >= (settings.conversion_scratch_bytes or 0) * settings.worker_concurrency
            assert env["PROMETHEUS_MULTIPROC_DIR"] in {m["mountPath"] for m in c["volumeMounts"]}


def test_gpu_workers_ask_for_a_gpu_node(renders):
    pod = pod_spec(_worker_classes(renders["prod"])["cuda"])
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    assert "cuda" not in _worker_classes(renders["dev"])  # opt-in


# KEDA's redis scaler (pkg/scalers/redis_scaler.go): the metadata keys it reads.
REDIS_SCALER_KEYS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "username",
                     "usernameFromEnv", "password", "passwordFromEnv", "databaseIndex", "enableTLS", "unsafeSsl",
                     "listName", "listLength", "activationListLength"}


def test_keda_scales_each_class_on_its_celery_queue(renders):
    docs = renders["prod"]
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    workers = _worker_classes(docs)
    assert set(scaled) == {d["metadata"]["name"] for d in workers.values()}
    poll = []
    for hardware_class, deployment in workers.items():
        so = scaled[deployment["metadata"]["name"]]
        assert "replicas" not in deployment["spec"]  # the HPA KEDA makes owns it
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "redis" and set(meta) <= REDIS_SCALER_KEYS, sorted(set(meta) - REDIS_SCALER_KEYS)
        # Celery on Redis keeps the queue as a list of exactly this name
        assert meta["listName"] == queue_name(hardware_class)
        assert int(meta["listLength"]) >= 1 and int(meta["activationListLength"]) == 0
        assert so["spec"]["minReplicaCount"] == 0
        (c,) = pod_spec(deployment)["containers"]
        assert meta["addressFromEnv"] in container_env(c, docs)
        auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {p["parameter"] for p in auth["spec"]["secretTargetRef"]} == {"password"}
        poll.append((so["spec"]["pollingInterval"], so["spec"]["cooldownPeriod"]))
    # idle workers linger between bursts instead of scaling to zero after every job
    assert all(cooldown >= 600 and cooldown >= 10 * interval for interval, cooldown in poll)


def test_celery_messages_land_in_the_plain_list(renders):
    """No priorities: kombu would spread a queue over suffixed lists KEDA's listName misses."""
    conf = celery_config(Settings(broker_url="redis://redis:6379/0"))
    assert "priority_steps" not in conf["broker_transport_options"]
    assert not any("priority" in key for key in conf)
    dev = renders["dev"]
    broker = next(d for d in dev if d["kind"] == "Secret")
    url = base64.b64decode(broker["data"]["broker-url"]).decode()
    so = next(d for d in dev if d["kind"] == "ScaledObject")
    assert url.rsplit("/", 1)[1] == so["spec"]["triggers"][0]["metadata"]["databaseIndex"]


def _secret_refs(obj: Any):
    """(secret name, key) pairs an object refers to."""
    if isinstance(obj, dict):
        if "secretKeyRef" in obj:
            yield obj["secretKeyRef"]["name"], obj["secretKeyRef"]["key"]
        if "secretName" in obj:
            for item in obj.get("items", []):
                yield obj["secretName"], item["key"]
        for value in obj.values():
            yield from _secret_refs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _secret_refs(value)


def test_dev_secret_has_every_key_the_pods_read(renders):
    docs = renders["dev"]
    secrets = {d["metadata"]["name"]: set(d["data"]) for d in docs if d["kind"] == "Secret"}
    refs = set(_secret_refs(docs))
    for doc in docs:
        if doc["kind"] == "TriggerAuthentication":
            refs |= {(r["name"], r["key"]) for r in doc["spec"]["secretTargetRef"]}
    assert refs
    for name, key in refs:
        assert key in secrets.get(name, set()), f"{name}/{key}"
    # prod brings its own Secret: the keys it must have are the same ones
    prod_keys = {key for _, key in _secret_refs(renders["prod"])}
    assert prod_keys <= set().union(*secrets.values())


def test_network_policies_deny_by_default_and_open_each_pods_ports(renders):
    docs = renders["prod"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for obj in workloads(docs):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if p["spec"]["podSelector"].get("matchLabels")
                and p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert mine, f"no policy lets {obj['metadata']['name']} talk"
        ports = {port["containerPort"] for c in containers(pod_spec(obj)) for port in c.get("ports", [])}
        opened = {port["port"] for p in mine for rule in p["spec"].get("ingress", []) for port in rule["ports"]}
        assert ports == opened, obj["metadata"]["name"]
        egress = {port["port"] for p in mine for rule in p["spec"].get("egress", []) for port in rule["ports"]}
        assert 5432 in egress  # every Quantyard pod reaches the catalog


def test_monitoring_targets_exist(renders):
    docs = renders["prod"]
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    service = find(docs, "Service", "quantyard-api")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    pm = next(d for d in docs if d["kind"] == "PodMonitor")
    for deployment in _worker_classes(docs).values():
        assert pm["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        (c,) = pod_spec(deployment)["containers"]
        assert pm["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in c["ports"]}
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"] == render.prometheus_rule()["spec"], "regenerate: python -m tests.deploy.render prometheusrule"
