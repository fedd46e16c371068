"""The phases a step's progress messages announce (stages.phase_of), which the workers time one
by one (quantyard_stage_duration_seconds): a real GGUF target step on the tiny Llama says
quantize, then validate, then evaluate, in that order, and nothing else (the clock they feed:
tests/deploy/test_worker_metrics.py)."""

from __future__ import annotations

import pytest

from quantyard.engine.gguf.converter import write_float_gguf
from quantyard.engine.hf.source import open_source
from quantyard.engine.spec import parse_target
from quantyard.engine.stages import make_eval_reference, make_reference, phase_of, quantize


def test_a_target_steps_messages_name_its_phases_in_order(tiny_llama_dir, tmp_path):
    f16 = tmp_path / "F16.gguf"
    write_float_gguf(open_source(tiny_llama_dir), f16, "F16")
    evaluation = make_eval_reference(tiny_llama_dir, chunks=1)
    phases: list[str] = []

    def progress(fraction: float, message: str) -> None:
        phase = phase_of(message, phases[-1] if phases else "quantize")
        if not phases or phases[-1] != phase:
            phases.append(phase)

    quantize(f16, parse_target("gguf:Q8_0"), tmp_path / "out", reference=tiny_llama_dir, progress=progress,
             outputs=make_reference(tiny_llama_dir), evaluation=evaluation)
    assert phases == ["quantize", "validate", "evaluate"]


@pytest.mark.parametrize(("message", "phase"), [
    ("quantized blk.0.attn_q.weight to q8_0", "quantize"),
    ("validating with llama.cpp against the source", "validate"),
    ("validating model-F16.gguf", "validate"),
    ("evaluate: evaluation chunk 1/2", "evaluate"),
    ("auto: measuring Q4_K_M+output=Q6_K", "search"),
    ("evaluation reference: chunk 1/2", "quantize"),  # not a phase word: the step's own work
])
def test_phase_words(message, phase):
    assert phase_of(message, "quantize") == phase
