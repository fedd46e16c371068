"""llama.cpp's reference tools for tests: the command-line binaries (llama-quantize,
llama-imatrix, llama-gguf-split) built by scripts/build-llama-tools.sh, and llama.cpp's own
per-tensor type choice (llama_quant_compute_types, exported by the libllama that llama-cpp-python
ships) called through ctypes. Independent oracles: nothing here uses Quantyard's engine."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = "0.3.36"
PREFIX = REPO / ".test-cache" / f"llama.cpp-{VERSION}"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-gguf-split")
BUILD_WAIT_S = 45 * 60


def _required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("QUANTYARD_REQUIRE_SERVICES") == "1"


def _built() -> bool:
    return all(os.access(PREFIX / "bin" / t, os.X_OK) for t in TOOLS)


def _build_running() -> bool:
    """Is scripts/build-llama-tools.sh running already (e.g. started by the developer)?"""
    r = subprocess.run(["pgrep", "-f", "build-llama-tools.sh"], capture_output=True, text=True)
    return r.returncode == 0 and bool(r.stdout.strip())


def locate_llama_tools() -> Path:
    """The bin folder; waits for a build in progress; builds in CI; skips loudly otherwise."""
    deadline = time.monotonic() + BUILD_WAIT_S
    while not _built() and _build_running() and time.monotonic() < deadline:
        time.sleep(10)
    if not _built() and _required():
        r = subprocess.run(["bash", str(REPO / "scripts" / "build-llama-tools.sh")], capture_output=True, text=True)
        if r.returncode != 0 or not _built():
            pytest.fail(f"scripts/build-llama-tools.sh failed:\n{r.stderr[-3000:]}", pytrace=False)
    if not _built():
        pytest.skip("!!! SKIPPED, LLAMA.CPP TOOLS MISSING: run `bash scripts/build-llama-tools.sh` "
                    f"(builds llama-quantize/llama-imatrix/llama-gguf-split into {PREFIX}/bin, ~20 min); "
                    "with CI or QUANTYARD_REQUIRE_SERVICES=1 this is a failure.")
    return PREFIX / "bin"


def run_tool(bin_dir: Path, tool: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(bin_dir / tool), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{tool} {' '.join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


# ---------------------------------------------------------------------------------------------
# llama.cpp's per-tensor type choice, straight from libllama (src/llama-quant.cpp, llama-ext.h)

class _ModelDesc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p)] + [(f, ctypes.c_uint32) for f in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_FROM_METADATA = "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc"
_INIT = "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params"
_COMPUTE = "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem"
_FREE = "_Z16llama_quant_freeP19quantize_state_impl"


def _libs():
    import llama_cpp

    ll = llama_cpp.llama_cpp._lib
    base = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    gg = ctypes.CDLL(str(base))
    missing = [s for s in (_FROM_METADATA, _INIT, _COMPUTE, _FREE) if not hasattr(ll, s)]
    if missing:
        pytest.fail(f"libllama lacks {missing}: llama-cpp-python is not {VERSION}", pytrace=False)
    p, vp = ctypes.POINTER, ctypes.c_void_p
    for name, res, args in ((_FROM_METADATA, vp, [p(_ModelDesc)]), (_INIT, vp, [vp, vp]),
                            (_COMPUTE, None, [vp, ctypes.c_int, p(vp), p(ctypes.c_int), ctypes.c_size_t]),
                            (_FREE, None, [vp])):
        getattr(ll, name).restype, getattr(ll, name).argtypes = res, args
    ll.llama_model_free.argtypes = [vp]
    gg.ggml_init.argtypes, gg.ggml_init.restype = [_InitParams], vp
    gg.ggml_new_tensor.argtypes, gg.ggml_new_tensor.restype = [vp, ctypes.c_int, ctypes.c_int, p(ctypes.c_int64)], vp
    gg.ggml_set_name.argtypes, gg.ggml_set_name.restype = [vp, ctypes.c_char_p], vp
    gg.ggml_free.argtypes = [vp]
    return llama_cpp, ll, gg


def llama_cpp_types(arch: str, *, n_layer: int, n_head: int, n_head_kv: int, n_expert: int,
                    tensors: list[tuple[str, tuple[int, ...], int]], ftype: int) -> list[int]:
    """llama.cpp's output ggml type ids for `tensors` ((name, ne, input type id), walked in the
    given order, as llama-quantize walks its sorted weights) of a model with these hparams."""
    llama_cpp, ll, gg = _libs()
    desc = _ModelDesc(arch.encode(), 256, 512, n_layer, n_head, n_head_kv, n_expert, 64, 64)
    model = getattr(ll, _FROM_METADATA)(ctypes.byref(desc))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    qs = getattr(ll, _INIT)(model, ctypes.byref(params))
    ctx = gg.ggml_init(_InitParams((1 << 20) + 1024 * len(tensors), None, True))
    try:
        ptrs = []
        for name, ne, type_id in tensors:
            t = gg.ggml_new_tensor(ctx, type_id, len(ne), (ctypes.c_int64 * len(ne))(*ne))
            gg.ggml_set_name(t, name.encode())
            ptrs.append(t)
        result = (ctypes.c_int * len(ptrs))()
        getattr(ll, _COMPUTE)(qs, ftype, (ctypes.c_void_p * len(ptrs))(*ptrs), result, len(ptrs))
        return list(result)
    finally:
        getattr(ll, _FREE)(qs)
        ll.llama_model_free(model)
        gg.ggml_free(ctx)
