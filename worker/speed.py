"""Speed of a GGUF artifact on the worker that made it (issue 13): llama-bench's pp/tg tests
(engine/gguf/speed.py) with the extent in Settings.speed_*, stored as metrics["speed"]; the
artifact's metadata["made_on"] names the hardware class the numbers belong to."""

from __future__ import annotations

from collections.abc import Callable


def add_speed(rt, result, *, progress: Callable[[float, str], None] | None = None) -> None:
    """Time `result` (a ConversionResult) in place when it is a GGUF and the test is on."""
    settings = rt.settings
    if result.format != "gguf" or settings.speed_repetitions == 0 or "speed" in result.metrics:
        return
    from quantyard.engine.gguf.speed import measure_speed

    if progress is not None:
        progress(0.0, f"speed: pp{settings.speed_n_prompt} and tg{settings.speed_n_gen} "
                      f"x {settings.speed_repetitions} (llama-bench's tests)")
    report = measure_speed(result.path, n_prompt=settings.speed_n_prompt, n_gen=settings.speed_n_gen,
                           repetitions=settings.speed_repetitions)
    result.metrics["speed"] = report.to_dict()
