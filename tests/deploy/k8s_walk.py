"""Walk rendered Kubernetes objects: workloads, their pod specs and containers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in WORKLOAD_KINDS)


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def worker_deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """hardware class -> its worker Deployment."""
    return {d["metadata"]["labels"]["quantyard.dev/hardware-class"]: d for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"}


def quantity_bytes(q: str | int) -> int:
    """A Kubernetes quantity (10Gi, 512Mi, 1G, 100) in bytes."""
    text = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * units[suffix])
    return int(float(text))


def cpu_millis(q: str | int) -> int:
    text = str(q)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The container's environment: envFrom ConfigMaps resolved (values), env entries as given
    (a value or its valueFrom)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(find(docs, "ConfigMap", ref["name"])["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env
