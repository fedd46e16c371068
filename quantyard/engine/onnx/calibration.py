"""Calibration data for int8-static: texts tokenized with the model's own tokenizer, or any list
of ready feeds (programs: random inputs from their specs)."""

from __future__ import annotations

from collections.abc import Sequence


def make_reader(tokenizer, names: Sequence[str], texts: Sequence[str]):
    """A CalibrationDataReader yielding one sentence per batch.

    Every batch is padded to the same length: the histogram calibrators (Entropy, Percentile)
    stack activations of all batches and fail on ragged shapes.
    """
    import numpy as np

    length = max(len(tokenizer(t)["input_ids"]) for t in texts)
    batches = []
    for text in texts:
        enc = tokenizer([text], padding="max_length", max_length=length, truncation=True, return_tensors="np")
        batches.append({n: enc[n].astype(np.int64) for n in names})
    return feeds_reader(batches)


def feeds_reader(batches: Sequence[dict]):
    """A rewindable CalibrationDataReader over a list of feed dicts."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedsReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    return FeedsReader()


__all__ = ["feeds_reader", "make_reader"]
