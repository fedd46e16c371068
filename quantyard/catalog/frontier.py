"""One source's artifacts as a size/quality frontier (GET /v1/sources/{id}/frontier, quantyard
compare): size, bits per weight, the quality report's mean KL and PPL ratio, speed, and which
are Pareto-optimal (engine/frontier.py mark_pareto: nothing else is both smaller and better).

The numbers are the artifact's own metrics as the worker recorded them: `metrics["quality"]`
(the evaluation report, issue 13) when there is one, else the validation's mean KL;
`metrics["speed"]` for GGUF (llama-bench's pp/tg), the ONNX latency metrics otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quantyard.engine.frontier import LOSSES, FrontierPoint, mark_pareto

from .errors import InvalidArgument
from .models import Artifact, JobTarget, LineageEdge
from .search import visibility

# A source has tens of artifacts; the frontier lists at most this many (newest first).
MAX_FRONTIER = 500
# Files that are not models people deploy (their importance matrices) stay out of it.
NOT_MODELS = ("imatrix",)


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def artifact_quality(art: Artifact) -> dict[str, float | None]:
    """The quality numbers shown for an artifact: the evaluation report's, else the
    validation's (a file made before evaluations existed)."""
    metrics = art.metrics or {}
    raw = metrics.get("quality")
    quality: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return {
        "mean_kl": _number(quality.get("mean_kl")) if quality else _number(metrics.get("mean_kl")),
        "ppl_ratio": _number(quality.get("ppl_ratio")),
        "top1_agreement": (_number(quality.get("top1_agreement")) if quality
                           else _number(metrics.get("top1_agreement"))),
        "cosine_min": _number(metrics.get("cosine_min")),
    }


def artifact_speed(art: Artifact) -> dict[str, Any] | None:
    """Tokens/s (GGUF: prompt processing and generation) or latency (ONNX), with the
    hardware class it was measured on; None when the artifact was not timed."""
    metrics, meta = art.metrics or {}, art.meta or {}
    speed = metrics.get("speed") if isinstance(metrics.get("speed"), dict) else None
    hardware = (meta.get("made_on") or {}).get("hardware_class") if isinstance(meta.get("made_on"), dict) else None
    if speed:
        return {"pp_tokens_per_s": _number(speed.get("pp_tokens_per_s")),
                "tg_tokens_per_s": _number(speed.get("tg_tokens_per_s")),
                "threads": speed.get("threads") if isinstance(speed.get("threads"), int) else None,
                "hardware_class": hardware}
    latency = _number(metrics.get("latency_ms_p50"))
    if latency is None:
        return None
    return {"latency_ms_p50": latency, "throughput_seq_per_s": _number(metrics.get("throughput_seq_per_s")),
            "hardware_class": hardware}


def artifact_result(art: Artifact) -> dict[str, Any]:
    """A job target's result in brief (GET /v1/jobs): the artifact's size, its quality report's
    headline numbers with the evaluation's time per 1k tokens, and its speed."""
    metrics = art.metrics or {}
    raw = metrics.get("quality")
    quality: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return {"artifact_id": art.id, "size_bytes": _size(art), **artifact_quality(art),
            "eval_seconds": _number(quality.get("eval_seconds")),
            "eval_seconds_per_1k_tokens": _number(quality.get("eval_seconds_per_1k_tokens")),
            "speed": artifact_speed(art)}


def _size(art: Artifact) -> int:
    total = (art.meta or {}).get("total_size_bytes")  # every shard of a split file
    return int(total) if isinstance(total, int) and not isinstance(total, bool) else int(art.size_bytes)


def _point(art: Artifact) -> FrontierPoint:
    quality = artifact_quality(art)
    return FrontierPoint(name=art.quantization, size_bytes=_size(art),
                         bits_per_weight=_number((art.metrics or {}).get("bits_per_weight")),
                         mean_kl=quality["mean_kl"], ppl_ratio=quality["ppl_ratio"], artifact_id=art.id,
                         extra={"format": art.format, "top1_agreement": quality["top1_agreement"],
                                "cosine_min": quality["cosine_min"], "speed": artifact_speed(art),
                                "created_at": art.created_at.isoformat() if art.created_at else None})


def source_frontier(s: Session, *, source_id: str, organization_id: str | None = None,
                    loss: str = "mean_kl") -> list[dict[str, Any]]:
    """Every listed artifact of the source (not withdrawn, not deleted), smallest first, each
    with its numbers and `pareto` (optimal in size vs `loss` among them)."""
    if loss not in LOSSES:
        raise InvalidArgument(f"loss must be one of {', '.join(LOSSES)}, not {str(loss)[:40]!r}")
    q = (select(Artifact).where(Artifact.source_id == source_id, Artifact.format.not_in(NOT_MODELS))
         .order_by(Artifact.created_at.desc(), Artifact.id).limit(MAX_FRONTIER))
    if organization_id is not None:
        q = q.where(Artifact.organization_id == organization_id)
    arts = s.execute(visibility(q, include_withdrawn=False, include_deleted=False)).scalars().all()
    points = sorted((_point(a) for a in arts), key=lambda p: (p.size_bytes, p.name, p.artifact_id or ""))
    return [{**p.to_dict(), "pareto": optimal} for p, optimal in mark_pareto(points, loss=loss)]


def known_presets(s: Session, *, source_id: str, presets: Sequence[str], parents: Sequence[str],
                  engine_version: str, text_sha256: str, n_ctx: int, n_chunks: int) -> dict[str, FrontierPoint]:
    """gguf:auto's reuse: the source's listed GGUF artifacts of plain presets (no tensor_types)
    made by this engine from exactly the artifacts in `parents` (the auto target's intermediate,
    its imatrix) and measured on the same evaluation text and extent, as {preset: point}; the
    newest one per preset. Such a point is what the search would measure again, byte for byte."""
    q = (select(Artifact).where(Artifact.source_id == source_id, Artifact.format == "gguf",
                                Artifact.quantization.in_(list(presets)), Artifact.engine_version == engine_version)
         .order_by(Artifact.created_at.desc(), Artifact.id).limit(MAX_FRONTIER))
    arts = s.execute(visibility(q, include_withdrawn=False, include_deleted=False)).scalars().all()
    if not arts:
        return {}
    edges = s.execute(select(LineageEdge.child_id, LineageEdge.parent_id).where(
        LineageEdge.child_type == "artifact", LineageEdge.parent_type == "artifact",
        LineageEdge.child_id.in_([a.id for a in arts]))).all()
    made_from: dict[str, set[str]] = {}
    for child, parent in edges:
        made_from.setdefault(child, set()).add(parent)
    params: dict[str, Any] = dict(s.execute(select(JobTarget.id, JobTarget.params).where(
        JobTarget.id.in_([a.target_id for a in arts if a.target_id]))).all())
    out: dict[str, FrontierPoint] = {}
    for art in arts:
        raw = (art.metrics or {}).get("quality")
        quality: dict[str, Any] = raw if isinstance(raw, dict) else {}
        same_text = (quality.get("text_sha256"), quality.get("n_ctx"), quality.get("n_chunks")) == (
            text_sha256, n_ctx, n_chunks)
        plain = art.target_id is not None and "tensor_types" not in (params.get(art.target_id) or {})
        if same_text and plain and made_from.get(art.id, set()) == set(parents) and art.quantization not in out:
            out[art.quantization] = _point(art)
    return out


__all__ = ["MAX_FRONTIER", "artifact_quality", "artifact_result", "artifact_speed", "known_presets", "source_frontier"]
