"""onnxruntime failures on an uploaded .onnx, told in our words.

onnxruntime's exception text names the server path it loaded from ("Load model from
/scratch/... failed") and is library text; a tenant gets the file's name, what kind of problem
onnxruntime reported (its exception type), and at most the operator it did not know.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidModel

# onnxruntime's pybind exception types (onnxruntime_pybind11_state) -> what they mean here
_REASONS = {
    "InvalidGraph": "its graph is not valid (an operator or type onnxruntime does not accept, or inputs that do not fit)",
    "InvalidProtobuf": "it is not a valid ONNX protobuf",
    "NotImplemented": "it uses an operator or type onnxruntime's CPU provider does not implement",
    "InvalidArgument": "some of its contents are invalid",
    "NoSuchFile": "a file it refers to is missing",
    "NoModel": "it holds no model",
}
_UNKNOWN_OP = re.compile(r"No Op registered for ([A-Za-z0-9_.]{1,64}) with domain_version of (\d{1,4})")


def ort_reason(error: BaseException) -> str:
    """What went wrong, without onnxruntime's text (only an unknown operator's name survives)."""
    reason = _REASONS.get(type(error).__name__, "onnxruntime reported an error")
    if (m := _UNKNOWN_OP.search(str(error))) is not None:
        reason += f"; no operator {m.group(1)} at opset {m.group(2)}"
    return reason


def source_session(path: Path, model_file: str, options: Any = None):
    """An InferenceSession on an uploaded .onnx; any failure to load is InvalidModel."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise
    except Exception as e:  # onnxruntime raises its own pybind types (Fail, InvalidGraph, ...) and RuntimeError
        raise InvalidModel(f"{model_file}: onnxruntime cannot load it: {ort_reason(e)}",
                           details={"file": model_file, "stage": "load"}) from None


def source_runner(sess, model_file: str) -> Callable[[dict], list]:
    """sess.run on feeds made from the input specs; a failure is the model's, said cleanly."""
    def run(feeds: dict) -> list:
        try:
            return sess.run(None, feeds)
        except MemoryError:
            raise
        except Exception as e:
            shapes = {k: list(getattr(v, "shape", ())) for k, v in feeds.items()}
            raise InvalidModel(f"{model_file}: onnxruntime cannot run it on inputs {shapes}: {ort_reason(e)}",
                               details={"file": model_file, "stage": "run"}) from None
    return run


__all__ = ["ort_reason", "source_session", "source_runner"]
