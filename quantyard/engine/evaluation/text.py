"""The text a quality report is computed on: the shipped default, or a user's (hostile) file.

The default (engine/data/evaluation/evaluation.txt, see the README there) mixes English
technical prose, Python code and text in fifteen other languages; ~28k tokens with a 49k
vocabulary. It is not the imatrix calibration text: a quantization measured on the text its
importance matrix was tuned on would look better than it is.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from ..errors import InvalidModel

# 1 MiB is ~250k tokens: ~1,000 chunks of 512, hours of evaluation on a CPU worker and a
# reference file of ~64 MB at top-k 64. Anything larger is a mistake or an attack.
MAX_EVALUATION_BYTES = 1 << 20
MIN_EVALUATION_BYTES = 64


def default_evaluation_text() -> str:
    """The evaluation text shipped with Quantyard (package data)."""
    return (resources.files("quantyard.engine.data.evaluation").joinpath("evaluation.txt")
            .read_text(encoding="utf-8"))


def check_evaluation_text(text: str, *, what: str = "the evaluation text") -> str:
    """`text` itself when it can be evaluated; InvalidModel saying why not (too large, too short,
    NUL bytes, which no tokenizer treats as text)."""
    if not isinstance(text, str):
        raise InvalidModel(f"{what} must be a string, not {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_EVALUATION_BYTES:
        raise InvalidModel(f"{what} is {size} bytes; at most {MAX_EVALUATION_BYTES} are allowed",
                           details={"bytes": size, "max_bytes": MAX_EVALUATION_BYTES})
    if size < MIN_EVALUATION_BYTES or not text.strip():
        raise InvalidModel(f"{what} is {size} bytes; at least {MIN_EVALUATION_BYTES} bytes of text are needed",
                           details={"bytes": size})
    if "\x00" in text:
        raise InvalidModel(f"{what} holds NUL characters: it is not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a lenient decoder
        raise InvalidModel(f"{what} holds characters that are not valid Unicode (lone surrogates)") from None
    return text


def load_evaluation_text(path: Path) -> str:
    """A user's evaluation file: UTF-8 (a BOM is dropped), at most MAX_EVALUATION_BYTES; the size
    is checked before anything is read into memory."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"evaluation file {path.name} does not exist or is not a file")
    size = path.stat().st_size
    if size > MAX_EVALUATION_BYTES:
        raise InvalidModel(f"evaluation file {path.name} is {size} bytes; at most {MAX_EVALUATION_BYTES} are "
                           "allowed", details={"file": path.name, "bytes": size, "max_bytes": MAX_EVALUATION_BYTES})
    with open(path, "rb") as f:
        raw = f.read(MAX_EVALUATION_BYTES + 1)  # the file may grow between stat and read
    if len(raw) > MAX_EVALUATION_BYTES:
        raise InvalidModel(f"evaluation file {path.name} is larger than {MAX_EVALUATION_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidModel(f"evaluation file {path.name} is not UTF-8 (invalid byte at offset {e.start})",
                           details={"file": path.name, "offset": e.start}) from None
    return check_evaluation_text(text, what=f"evaluation file {path.name}")


def text_sha256(text: str) -> str:
    """The digest a reference records of the text it was computed on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = ["MAX_EVALUATION_BYTES", "MIN_EVALUATION_BYTES", "default_evaluation_text", "check_evaluation_text",
           "load_evaluation_text", "text_sha256"]
