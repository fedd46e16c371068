"""EvalReference.load refuses malformed and hostile files (one case per check); a user's
evaluation text that is not UTF-8, too big, too short or holds NUL is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from quantyard.engine.errors import InvalidModel
from quantyard.engine.evaluation import MAX_EVALUATION_BYTES, EvalReference, load_evaluation_text
from quantyard.engine.evaluation.reference import FORMAT

N_CTX, K, T, V = 32, 4, 3, 50
N = 2 * (N_CTX - 1 - N_CTX // 2)


def _arrays():
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(V), size=N))
    order = np.argsort(-logp, axis=1, kind="stable")
    top, tail = order[:, :K], order[:, K:K + T]
    rest = np.log(1 - np.exp(np.take_along_axis(logp, top, 1)).sum(1))
    return {"tokens": rng.integers(0, V, (2, N_CTX)).astype(np.int32), "top_ids": top.astype(np.int32),
            "top_logp": np.take_along_axis(logp, top, 1).astype(np.float32), "rest_logp": rest.astype(np.float32),
            "next_logp": logp[:, 0].astype(np.float32), "tail_ids": tail.astype(np.int32),
            "tail_logp": np.take_along_axis(logp, tail, 1).astype(np.float32)}


def _write(path, arrays, **meta):
    save_file(arrays, str(path), metadata={"format": FORMAT, "n_vocab": str(V), "text_sha256": "a" * 64, **meta})
    return path


def test_round_trip(tmp_path):
    ref = EvalReference.load(_write(tmp_path / "r.safetensors", _arrays()))
    ref.save(tmp_path / "again.safetensors")
    again = EvalReference.load(tmp_path / "again.safetensors")
    assert again.n_scored == N and again.top_k == K and again.n_chunks == 2
    assert np.array_equal(again.top_ids, ref.top_ids) and again.source_ppl == pytest.approx(ref.source_ppl)


def _set(name, value):
    def change(a):
        a[name] = value(a[name])
    return change


CASES = {
    "format": ({"format": "other/1"}, None),
    "digest": ({"text_sha256": "zz"}, None),
    "n_vocab": ({"n_vocab": "-3"}, None),
    "missing tensor": ({}, lambda a: a.pop("tail_ids")),
    "dtype": ({}, _set("top_logp", lambda x: x.astype(np.float64))),
    "shape": ({}, _set("next_logp", lambda x: x[:-1])),
    "id outside vocabulary": ({}, _set("top_ids", lambda x: np.where(x == x.max(), V + 5, x).astype(np.int32))),
    "NaN": ({}, _set("rest_logp", lambda x: np.where(np.arange(x.size) == 3, np.nan, x).astype(np.float32))),
    "positive log-prob": ({}, _set("next_logp", lambda x: np.abs(x) + 1)),
    "not descending": ({}, _set("top_logp", lambda x: x[:, ::-1].copy())),
    "not normalised": ({}, _set("rest_logp", lambda x: x - 2)),
    "tail in top-k": ({}, _set("tail_ids", lambda x: x.copy() * 0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_refuses(tmp_path, case):
    meta, change = CASES[case]
    arrays = _arrays()
    if change:
        change(arrays)
    path = _write(tmp_path / "bad.safetensors", arrays, **meta)
    with pytest.raises(InvalidModel, match="evaluation reference bad.safetensors"):
        EvalReference.load(path)


def test_load_refuses_garbage(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidModel):
        EvalReference.load(tmp_path / "g.safetensors")


def test_user_text_checks(tmp_path):
    good = tmp_path / "ok.txt"
    good.write_bytes("\ufeffHello, wörld. ".encode() * 10)
    assert load_evaluation_text(good).startswith("Hello")
    cases = {"bad.txt": (b"valid " * 20 + b"\xff\xfe", "not UTF-8"),
             "big.txt": (b"a" * (MAX_EVALUATION_BYTES + 1), "at most"),
             "short.txt": (b"tiny", "at least"), "nul.txt": (b"text\x00" * 30, "NUL")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidModel, match=message):
            load_evaluation_text(tmp_path / name)
