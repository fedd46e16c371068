"""A Hugging Face style model card (Markdown with YAML front matter) for one artifact.

The front matter follows the Hub's conventions for quantized derivatives (``base_model``,
``base_model_relation: quantized``, ``library_name``, ``tags``, ``pipeline_tag``) and adds a
``quantyard`` block with the identity a machine can check (sha256, recipe hash, engine).
"""

from __future__ import annotations

import json
import math
from typing import Any

from . import facts

# ------------------------------------------------------------------- front matter (YAML subset)

def _scalar(value: Any) -> str:
    # JSON scalars are valid YAML 1.2 (double-quoted strings with JSON escapes); quoting every
    # string keeps names such as "no" or "1e3" strings.
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    return json.dumps(value, ensure_ascii=False)


def _yaml(value: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += _yaml(item, indent + 2)
            elif isinstance(item, (dict, list)):
                lines.append(f"{pad}{key}: {'{}' if isinstance(item, dict) else '[]'}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    else:  # a non-empty list of scalars or mappings
        for item in value:
            if isinstance(item, dict) and item:
                first, *rest = _yaml(item, indent + 2)
                lines.append(f"{pad}- {first.lstrip()}")
                lines += rest
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return lines


def front_matter(artifact: dict, source: dict, steps: list[facts.Step]) -> dict[str, Any]:
    name, repo = facts.base_model(artifact, source)
    fmt, quant = artifact.get("format"), artifact.get("quantization")
    metrics = artifact.get("metrics") or {}
    tags = [t for t in (fmt, "quantized", quant, "quantyard") if t]
    if facts.imatrix_info(artifact, steps):
        tags.append("imatrix")
    meta: dict[str, Any] = {"base_model": name, "base_model_relation": "quantized"}
    if fmt in facts.LIBRARIES:
        meta["library_name"] = facts.LIBRARIES[fmt]
    if facts.pipeline_tag(artifact, source):
        meta["pipeline_tag"] = facts.pipeline_tag(artifact, source)
    meta["tags"] = tags
    block = {
        "artifact_id": artifact.get("id"), "format": fmt, "quantization": quant,
        "sha256": artifact.get("sha256"), "size_bytes": artifact.get("size_bytes"),
        "recipe_hash": artifact.get("recipe_hash"), "engine_version": artifact.get("engine_version"),
        "source_id": source.get("id"), "source_sha256": source.get("sha256"),
        "base_model_repo": repo,
    }
    if "bits_per_weight" in metrics:
        block["bits_per_weight"] = metrics["bits_per_weight"]
    report = metrics.get("quality") if isinstance(metrics.get("quality"), dict) else {}
    for key in ("mean_kl", "ppl_ratio", "top1_agreement"):  # the evaluation's, for the Hub's readers
        if isinstance(report.get(key), (int, float)):
            block[f"quality_{key}"] = report[key]
    meta["quantyard"] = {k: v for k, v in block.items() if v is not None}
    return meta


# ------------------------------------------------------------------- body sections

def _code(text: Any) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def _table(rows: list[tuple[str, str]], head: tuple[str, str] = ("", "")) -> list[str]:
    out = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    return out + [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]


def _quantization(artifact: dict, steps: list[facts.Step]) -> list[str]:
    meta, metrics = artifact.get("metadata") or {}, artifact.get("metrics") or {}
    rows = [("format", artifact.get("format")), ("quantization type", artifact.get("quantization"))]
    if "bits_per_weight" in metrics:
        rows.append(("bits per weight", facts.fmt_value("bits_per_weight", metrics["bits_per_weight"])))
    if meta.get("parameter_count"):
        rows.append(("parameters", f"{meta['parameter_count']:,}"))
    if isinstance(meta.get("tensor_types"), dict):
        types = sorted(meta["tensor_types"].items(), key=lambda kv: (-kv[1], kv[0]))
        rows.append(("tensor types", ", ".join(f"{t} × {n}" for t, n in types)))
    if "fallbacks" in meta:
        rows.append(("fallbacks", _fallbacks(meta["fallbacks"])))
    if meta.get("requantized_from"):
        rows.append(("requantized from", meta["requantized_from"]))
    if isinstance(meta.get("quantization"), dict):  # ONNX: the quantizer's parameters
        rows += [(f"quantizer {k}", _code(json.dumps(v)) if isinstance(v, (dict, list)) else v)
                 for k, v in meta["quantization"].items()]
    for key in ("task", "opset", "exporter"):
        if meta.get(key) is not None:
            rows.append((key, meta[key]))
    out = ["## Quantization", ""] + _table(rows, ("", "value"))
    imatrix = facts.imatrix_info(artifact, steps)
    out += ["", "Importance matrix: " + (
        "none (plain quantization)." if not imatrix else
        ", ".join(f"{k} {_code(v)}" for k, v in imatrix.items() if v not in (None, "")) + ".")]
    return out


def _fallbacks(fallbacks: Any) -> str:
    if not fallbacks:
        return "none"
    if isinstance(fallbacks, list):
        shown = [f"{f.get('tensor', f.get('name', '?'))} → {f.get('type', f.get('to', '?'))}" if isinstance(f, dict)
                 else str(f) for f in fallbacks[:8]]
        more = f" (+{len(fallbacks) - 8} more)" if len(fallbacks) > 8 else ""
        return f"{len(fallbacks)}: " + "; ".join(shown) + more
    return str(fallbacks)


def _metrics(artifact: dict) -> list[str]:
    metrics = artifact.get("metrics") or {}
    rows = [(label, facts.fmt_value(key, value)) for key, label, value in facts.measured(metrics)]
    out = ["## Measured (validated against the source before publishing)", ""]
    out += _table(rows, ("metric", "value")) if rows else ["No measurements were recorded."]
    notes = [f"{k.replace('_', ' ')}: {v}" for k, v in sorted(metrics.items()) if isinstance(v, str)]
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    hw = facts.hardware(artifact)
    if hw:
        flags = ", ".join(hw.get("cpu_flags") or []) or "none recorded"
        out += ["", (f"Made{' and timed' if 'latency_ms_p50' in metrics else ''} on hardware class "
                     f"{_code(hw.get('hardware_class'))} (worker {_code(hw.get('worker_id'))}, "
                     f"{hw.get('machine')}, {hw.get('cpu_count')} CPUs, flags: {flags}).")]
    return out


def _quality(artifact: dict) -> list[str]:
    """The quality report on the evaluation text and the speed, when the artifact has them."""
    rows, speed = facts.quality(artifact), facts.speed(artifact)
    if not rows and not speed:
        return []
    out = []
    if rows:
        out += ["## Quality report", "",
                "Computed as llama.cpp's `llama-perplexity --kl-divergence` does: the evaluation text in chunks, "
                "the second half of each chunk scored against the source model's outputs.", ""]
        out += _table([(label, value) for _, label, value in rows], ("measure", "value"))
    if speed:
        hw = facts.hardware(artifact) or {}
        out += ([""] if out else []) + ["## Speed", "",
                                        f"Measured like `llama-bench` on hardware class {_code(hw.get('hardware_class'))} "
                                        f"({hw.get('machine')}, {hw.get('cpu_count')} CPUs).", ""]
        out += _table([(label, value) for _, label, value in speed], ("measure", "value"))
    return out


def _lineage(steps: list[facts.Step]) -> list[str]:
    out = ["## Lineage", ""]
    for n, step in enumerate(steps, 1):
        what = {"source": "source", "intermediate": "intermediate", "imatrix": "importance matrix",
                "artifact": "this artifact"}[step.role]
        line = f"{n}. {what} {_code(step.label)} ({step.type} {_code(step.id)}"
        if step.node.get("sha256"):
            line += f", sha256 {_code(step.node['sha256'])}"
        line += ")"
        if step.recipe:
            target = step.recipe.get("target") or {}
            params = json.dumps(target.get("params") or {}, sort_keys=True)
            line += (f" — made by {_code(step.recipe.get('converter'))} → {target.get('format')}:"
                     f"{target.get('quantization')} params {_code(params)}, engine "
                     f"{_code(step.recipe.get('engine_version'))}, recipe {_code(step.recipe_hash)}")
        out.append(line)
    return out


def _files(artifact: dict) -> list[str]:
    meta = artifact.get("metadata") or {}
    rows = [(artifact.get("filename"), f"{artifact.get('size_bytes'):,} B", artifact.get("sha256"))]
    rows += [(c.get("name"), f"{c.get('size_bytes', 0):,} B", c.get("sha256"))
             for c in meta.get("companion_files") or []]
    out = ["## Files", "", "| file | size | sha256 |", "|---|---|---|"]
    out += [f"| {_code(n)} | {s} | {_code(h)} |" for n, s, h in rows]
    return out + ["", (f"Engine: {_code(artifact.get('engine_version'))}; recipe hash "
                       f"{_code(artifact.get('recipe_hash'))}.")]


def _usage(artifact: dict, base: str) -> list[str]:
    name = artifact.get("filename") or "model"
    fetch = [f"quantyard download {artifact.get('id')} -o .", f"sha256sum {name}  # {artifact.get('sha256')}"]
    if artifact.get("format") == "gguf":
        return ["## Use it", "", "```sh", *fetch,
                f'llama-cli -m {name} -p "Once upon a time" -n 64',
                f"llama-server -m {name} --port 8080   # OpenAI-compatible HTTP server", "```",
                "", "A split GGUF is loaded by naming its first shard; llama.cpp finds the rest."]
    if artifact.get("format") == "onnx":
        meta = artifact.get("metadata") or {}
        inputs = meta.get("inputs") or ["input_ids", "attention_mask"]
        return ["## Use it", "", "```sh", *fetch, "```", "", "```python",
                "import onnxruntime as ort",
                "from transformers import AutoTokenizer", "",
                f'session = ort.InferenceSession("{name}", providers=["CPUExecutionProvider"])',
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
                'enc = tokenizer(["Hello world"], return_tensors="np")',
                f"names = {json.dumps([i for i in inputs if not str(i).startswith('past_key_values')])}",
                "outputs = session.run(None, {n: enc[n] for n in names if n in enc})",
                "```"]
    return ["## Use it", "", "```sh", *fetch, "```"]


def model_card(artifact: dict, source: dict, lineage: dict) -> str:
    """Markdown model card of `artifact` (``Artifact.to_dict()``) made from `source`
    (``Source.to_dict()``), with `lineage` as ``catalog.lineage`` returns it."""
    steps = facts.chain(artifact, source, lineage)
    meta = front_matter(artifact, source, steps)
    title = f"{source.get('name') or meta['base_model']} — {artifact.get('quantization')} {str(artifact.get('format')).upper()}"
    intro = (f"{artifact.get('quantization')} {str(artifact.get('format')).upper()} quantization of "
             f"{_code(meta['base_model'])}, made and validated by Quantyard "
             f"({_code(artifact.get('engine_version'))}). Source upload {_code(source.get('name'))}, "
             f"sha256 {_code(source.get('sha256'))}.")
    sections = [_quantization(artifact, steps), _metrics(artifact), _quality(artifact), _lineage(steps),
                _files(artifact), _usage(artifact, meta["base_model"])]
    lines = ["---", *_yaml(meta), "---", "", f"# {title}", "", intro]
    for section in sections:
        lines += [""] + section if section else []
    return "\n".join(lines) + "\n"
