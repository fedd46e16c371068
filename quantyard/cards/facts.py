"""What a model card and an ML-BOM say about an artifact, read from plain catalog dicts.

Inputs are ``Artifact.to_dict()``, ``Source.to_dict()`` and ``catalog.lineage(...)`` (its
``upstream`` nodes and ``edges``). A node's own ``recipe`` in ``upstream`` is the recipe of the
edge that *reached* it (its child's), so who made a node is read from the edges instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

HF_URL = re.compile(r"^https?://huggingface\.co/([^/\s?#]+/[^/\s?#]+?)/?(?:[?#].*)?$")
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Where a Hugging Face repo id (or URL) of the base model may have been recorded: the source's
# metadata (an upload's form fields, a GGUF source's header) or the artifact's GGUF metadata.
BASE_MODEL_KEYS = (
    "base_model", "hf_repo_id", "hf_repo", "repo_id", "general.base_model.0.repo_url",
    "general.base_model.0.name", "general.source.repo_url", "general.source.url",
    "source_repo_url", "source_url",
)

LIBRARIES = {"gguf": "llama.cpp", "onnx": "onnxruntime"}
ROLE_ORDER = {"source": 0, "intermediate": 1, "imatrix": 2, "artifact": 3}


@dataclass(frozen=True)
class Step:
    """One node of the artifact's upstream chain and the recipe (edge) that produced it."""

    role: str  # source | intermediate | imatrix | artifact
    type: str  # "source" or "artifact" (the catalog's node type)
    id: str
    node: dict[str, Any]
    depth: int
    parents: list[tuple[str, str]] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_hash: str | None = None

    @property
    def label(self) -> str:
        if self.type == "source":
            return str(self.node.get("name") or self.id)
        return str(self.node.get("filename") or f"{self.node.get('format')}:{self.node.get('quantization')}")


def hf_repo_id(ref: Any) -> str | None:
    """"org/name" or a huggingface.co URL -> "org/name"; anything else -> None."""
    if not isinstance(ref, str):
        return None
    ref = ref.strip()
    m = HF_URL.match(ref)
    if m:
        return m.group(1)
    return ref if HF_REPO_ID.match(ref) and "://" not in ref else None


def base_model(artifact: dict, source: dict) -> tuple[str, str | None]:
    """(what to call the base model, its Hugging Face repo id when one is recorded). Falls back
    on the source's name (a local upload carries no repo id)."""
    candidates = []
    for meta in ((source.get("metadata") or {}), (artifact.get("metadata") or {})):
        candidates += [meta.get(k) for k in BASE_MODEL_KEYS if meta.get(k)]
    for ref in candidates:
        repo = hf_repo_id(ref)
        if repo:
            return repo, repo
    name = next((c for c in candidates if isinstance(c, str) and "://" not in c), None)
    return str(name or source.get("name") or (source.get("metadata") or {}).get("name") or source.get("id")), None


def _role(node_type: str, node: dict, is_self: bool) -> str:
    if is_self:
        return "artifact"
    if node_type == "source":
        return "source"
    return "imatrix" if node.get("format") == "imatrix" else "intermediate"


def chain(artifact: dict, source: dict, graph: dict) -> list[Step]:
    """The artifact's upstream, farthest first (source, intermediate, imatrix), ending with the
    artifact itself; each step carries the recipe of the edge(s) that made it."""
    me = ("artifact", artifact["id"])
    nodes: dict[tuple[str, str], dict] = {(n["type"], n["id"]): n for n in graph.get("upstream") or []}
    nodes[me] = {**{k: artifact.get(k) for k in ("format", "quantization", "filename", "sha256", "size_bytes")},
                 "type": "artifact", "id": artifact["id"], "depth": 0}
    src_key = ("source", source["id"])
    if src_key not in nodes:  # a lineage without its source edge still names where it came from
        deepest = max(n.get("depth", 0) for n in nodes.values())
        nodes[src_key] = {"type": "source", "id": source["id"], "depth": deepest + 1}
    nodes[src_key] = {**nodes[src_key], **{k: source.get(k) for k in ("name", "sha256", "architecture")}}
    made_by: dict[tuple[str, str], list[dict]] = {}
    for edge in graph.get("edges") or []:
        made_by.setdefault((edge["child"]["type"], edge["child"]["id"]), []).append(edge)
    steps = []
    for key, node in nodes.items():
        edges = made_by.get(key, [])
        steps.append(Step(
            role=_role(key[0], node, key == me), type=key[0], id=key[1], node=node,
            depth=int(node.get("depth") or 0),
            parents=[(e["parent"]["type"], e["parent"]["id"]) for e in edges],
            recipe=dict(edges[0].get("recipe") or {}) if edges else {},
            recipe_hash=edges[0].get("recipe_hash") if edges else None,
        ))
    return sorted(steps, key=lambda s: (-s.depth, ROLE_ORDER[s.role], s.id))


def engine_tool(engine_version: str | None) -> tuple[str, str]:
    """"quantyard-engine/0.1.0" -> ("quantyard-engine", "0.1.0")."""
    name, _, version = (engine_version or "quantyard-engine/unknown").partition("/")
    return name or "quantyard-engine", version or "unknown"


def architecture(artifact: dict, source: dict) -> str | None:
    meta = artifact.get("metadata") or {}
    smeta = source.get("metadata") or {}
    archs = smeta.get("architectures") or []
    return (source.get("architecture") or meta.get("architecture") or (archs[0] if archs else None)
            or smeta.get("architecture"))


def task(artifact: dict, source: dict) -> str | None:
    """The Hugging Face pipeline tag: what the ONNX export recorded, else guessed from the
    architecture class name (GGUF carries causal language models)."""
    recorded = (artifact.get("metadata") or {}).get("task")
    if recorded:
        return str(recorded)
    arch = architecture(artifact, source) or ""
    if arch.endswith("ForCausalLM") or artifact.get("format") == "gguf":
        return "text-generation"
    return None


# Engine task names -> Hugging Face pipeline tags, where they differ.
PIPELINE_TAGS = {"sequence-classification": "text-classification"}


def pipeline_tag(artifact: dict, source: dict) -> str | None:
    name = task(artifact, source)
    return PIPELINE_TAGS.get(name, name) if name else None


# Metric key -> (label, format). Other measurements are listed after these as recorded.
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "mean_kl": ("mean KL divergence vs source", "{:.6f}"),
    "max_kl": ("max KL divergence vs source", "{:.6f}"),
    "top1_agreement": ("top-1 token agreement with source", "{:.2%}"),
    "top1_agreement_decisive": ("top-1 agreement (decisive positions)", "{:.2%}"),
    "max_abs_logit_diff": ("max abs logit difference", "{:.4g}"),
    "probe_tokens": ("probe tokens compared", "{}"),
    "bits_per_weight": ("bits per weight", "{:.4f}"),
    "size_bytes": ("size (bytes)", "{:,}"),
    "max_abs_diff": ("max abs difference vs PyTorch", "{:.4g}"),
    "cosine_min": ("min cosine similarity vs PyTorch", "{:.6f}"),
    "token_cosine_min": ("min token cosine similarity", "{:.6f}"),
    "top1_prefill_agreement": ("top-1 agreement (prefill)", "{:.2%}"),
    "generation_token_agreement": ("greedy generation token agreement", "{:.2%}"),
    "latency_ms_p50": ("latency p50 (ms)", "{:.3f}"),
    "latency_ms_p90": ("latency p90 (ms)", "{:.3f}"),
    "prefill_latency_ms_p50": ("prefill latency p50 (ms)", "{:.3f}"),
    "throughput_seq_per_s": ("throughput (sequences/s)", "{:.1f}"),
    "throughput_samples_per_s": ("throughput (samples/s)", "{:.1f}"),
    "tokens_per_s": ("decode throughput (tokens/s)", "{:.1f}"),
    "compression_vs_fp32": ("compression vs fp32", "{:.2f}x"),
    "fp32_size_bytes": ("fp32 size (bytes)", "{:,}"),
}


def fmt_value(key: str, value: Any) -> str:
    label_fmt = METRIC_LABELS.get(key)
    if label_fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return label_fmt[1].format(value)
        except (ValueError, TypeError):
            pass
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def measured(metrics: dict) -> list[tuple[str, str, Any]]:
    """(key, label, value) of every scalar measurement: the known ones first, in a fixed order,
    then any other number or flag the engine recorded. Strings (e.g. ``cosine_of``) are context,
    not measurements, and lists are left to the JSON record."""
    out = [(k, METRIC_LABELS[k][0], metrics[k]) for k in METRIC_LABELS if k in metrics]
    for key in sorted(metrics):
        value = metrics[key]
        if key not in METRIC_LABELS and isinstance(value, (int, float, bool)):
            out.append((key, key.replace("_", " "), value))
    return out


# The quality report (metrics["quality"], issue 13: llama-perplexity's statistics on the evaluation
# text) and the speed (metrics["speed"], llama-bench's pp/tg): key -> (label, format).
QUALITY_LABELS: dict[str, tuple[str, str]] = {
    "ppl": ("perplexity", "{:.4f}"),
    "ppl_source": ("perplexity of the source", "{:.4f}"),
    "ppl_ratio": ("perplexity ratio (artifact / source)", "{:.4f}"),
    "mean_kl": ("mean KL divergence vs source", "{:.6f}"),
    "mean_kl_ci95": ("mean KL 95% confidence half-width", "{:.6f}"),
    "kl_p99": ("KL divergence p99", "{:.6f}"),
    "kl_max": ("KL divergence max", "{:.6f}"),
    "top1_agreement": ("same top token as the source", "{:.2%}"),
    "mean_delta_p": ("mean Δp of the right token", "{:.4%}"),
    "rms_delta_p": ("RMS Δp", "{:.4%}"),
    "n_tokens": ("tokens scored", "{:,}"),
    "n_chunks": ("chunks", "{}"),
    "n_ctx": ("context per chunk", "{}"),
    "reference_top_k": ("reference top-k log-probabilities", "{}"),
    "eval_seconds_per_1k_tokens": ("evaluation seconds per 1k tokens", "{:.3f}"),
}
# An ONNX encoder's report on the held-apart sentences (metrics["heldout"]), keyed "heldout_*".
HELDOUT_LABELS: dict[str, tuple[str, str]] = {
    "cosine_min": ("worst cosine vs PyTorch on held-apart sentences", "{:.6f}"),
    "cosine_mean": ("mean cosine vs PyTorch on held-apart sentences", "{:.6f}"),
    "token_cosine_min": ("worst per-token cosine on held-apart sentences", "{:.6f}"),
    "max_abs_diff": ("largest difference on held-apart sentences", "{:.3g}"),
    "sentences": ("held-apart sentences", "{}"),
}
SPEED_LABELS: dict[str, tuple[str, str]] = {
    "pp_tokens_per_s": ("prompt processing (tokens/s)", "{:.1f}"),
    "tg_tokens_per_s": ("generation (tokens/s)", "{:.1f}"),
    "n_prompt": ("prompt tokens (pp)", "{}"),
    "n_gen": ("generated tokens (tg)", "{}"),
    "threads": ("threads", "{}"),
}


def _labelled(values: Any, labels: dict[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(key, label, formatted value) of the known numbers in `values`, in the labels' order."""
    if not isinstance(values, dict):
        return []
    out = []
    for key, (label, fmt) in labels.items():
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out.append((key, label, fmt.format(value)))
            except (ValueError, TypeError):
                out.append((key, label, str(value)))
    return out


def quality(artifact: dict) -> list[tuple[str, str, str]]:
    """The artifact's quality report as (key, label, value) rows ([] when it has none): the
    evaluation text's (GGUF, ONNX decoders), else the held-apart sentences' (ONNX encoders)."""
    metrics = artifact.get("metrics") or {}
    rows = _labelled(metrics.get("quality"), QUALITY_LABELS)
    return rows + [(f"heldout_{k}", label, v) for k, label, v in _labelled(metrics.get("heldout"), HELDOUT_LABELS)]


def speed(artifact: dict) -> list[tuple[str, str, str]]:
    """The artifact's measured speed as (key, label, value) rows ([] when it was not timed)."""
    return _labelled((artifact.get("metrics") or {}).get("speed"), SPEED_LABELS)


def hardware(artifact: dict) -> dict | None:
    """The worker the artifact was made (and timed) on: speed numbers mean nothing without it."""
    made_on = (artifact.get("metadata") or {}).get("made_on")
    return dict(made_on) if isinstance(made_on, dict) else None


def imatrix_info(artifact: dict, steps: list[Step]) -> dict | None:
    info = (artifact.get("metadata") or {}).get("imatrix")
    step = next((s for s in steps if s.role == "imatrix"), None)
    if not info and step is None:
        return None
    out = dict(info or {})
    if step is not None:
        out.setdefault("artifact_id", step.id)
        out.setdefault("sha256", step.node.get("sha256"))
        calibration = ((step.recipe.get("target") or {}).get("params") or {}).get("calibration")
        if calibration:
            out.setdefault("calibration", calibration)
    return out
