"""ggml's own quantizers, called through ctypes from the libggml-base that llama-cpp-python ships.

Using the reference C code (not a re-implementation) is what makes our quantized tensors
byte-identical to llama.cpp's. The functions are generic over ggml types: F16, BF16, Q8_0 and
every k-/i-quant go through the same `ggml_quantize_chunk` entry point.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

_LIB_NAME = "libggml-base.so"


def _find_library() -> Path:
    """The libggml-base bundled in the installed llama_cpp package (found without importing it,
    which would load the whole llama runtime)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama-cpp-python is not installed; it provides ggml's quantizers")
    for base in spec.submodule_search_locations:
        for candidate in sorted((Path(base) / "lib").glob(_LIB_NAME + "*")):
            return candidate
    raise ImportError(f"{_LIB_NAME} not found under the llama_cpp package")


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_find_library()))
    i64, sz, ty = ctypes.c_int64, ctypes.c_size_t, ctypes.c_int
    lib.ggml_quantize_chunk.argtypes = [ty, ctypes.c_void_p, ctypes.c_void_p, i64, i64, i64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = sz
    lib.ggml_quantize_init.argtypes = [ty]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ty]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ty, i64]
    lib.ggml_row_size.restype = sz
    lib.ggml_blck_size.argtypes = [ty]
    lib.ggml_blck_size.restype = i64
    lib.ggml_type_name.argtypes = [ty]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_validate_row_data.argtypes = [ty, ctypes.c_void_p, sz]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_fp16_to_fp32_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i64]
    lib.ggml_fp16_to_fp32_row.restype = None
    return lib


@functools.cache
def _dequantize_fn(ggml_type: int):
    """ggml's own `dequantize_row_<type>(src, dst, k)`: the to_float that llama.cpp's quantizer
    uses on quantized input, so a requantized tensor matches llama-quantize --allow-requantize."""
    fn = getattr(_lib(), f"dequantize_row_{type_name(ggml_type)}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    return fn


def type_name(ggml_type: int) -> str:
    return _lib().ggml_type_name(int(ggml_type)).decode()


def block_size(ggml_type: int) -> int:
    return int(_lib().ggml_blck_size(int(ggml_type)))


def row_size(ggml_type: int, n_per_row: int) -> int:
    """Bytes of one quantized row of `n_per_row` values."""
    return int(_lib().ggml_row_size(int(ggml_type), int(n_per_row)))


def requires_imatrix(ggml_type: int) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(int(ggml_type)))


def quantize(data: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None, nthread: int = 1) -> np.ndarray:
    """Quantize a float32 array (rows = last axis) to `ggml_type`; returns the raw bytes as uint8
    with shape (*data.shape[:-1], row_bytes), the layout GGUFWriter expects for quantized data.
    `nthread` > 1 splits the rows across threads (same bytes: rows are independent)."""
    src = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = src.shape[-1] if src.ndim else 1
    nrows = src.size // n_per_row if n_per_row else 0
    if n_per_row % block_size(ggml_type):
        raise ValueError(f"row of {n_per_row} values is not a multiple of {type_name(ggml_type)}'s block")
    if requires_imatrix(ggml_type) and imatrix is None:
        raise ValueError(f"{type_name(ggml_type)} requires an importance matrix")
    qw = None
    if imatrix is not None:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        if qw.shape != (n_per_row,):
            raise ValueError(f"imatrix has shape {qw.shape}, expected ({n_per_row},)")
    out = np.empty((*src.shape[:-1], row_size(ggml_type, n_per_row)), dtype=np.uint8)
    lib = _lib()
    lib.ggml_quantize_init(int(ggml_type))  # builds lookup tables the i-quants need; idempotent
    flat_src, flat_out = src.reshape(nrows, n_per_row), out.reshape(nrows, -1)
    written = _run_chunks(lib, int(ggml_type), flat_src, flat_out, qw.ctypes.data if qw is not None else None,
                          _ranges(nrows, n_per_row, nthread), nthread)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def _run_chunks(lib, ggml_type: int, src: np.ndarray, out: np.ndarray, qw, ranges: list[tuple[int, int]],
                nthread: int = 1) -> int:
    """ggml_quantize_chunk over row ranges of (nrows, n) `src` into (nrows, row_bytes) `out`, on
    up to `nthread` threads taking ranges as they finish (ctypes drops the GIL during the C
    call); returns the bytes written."""
    n_per_row = src.shape[1]

    def work(first: int, count: int) -> int:
        return lib.ggml_quantize_chunk(ggml_type, src[first:].ctypes.data, out[first:].ctypes.data,
                                       0, count, n_per_row, qw)

    if len(ranges) == 1:
        return int(work(*ranges[0]))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(nthread, len(ranges))) as pool:
        return sum(pool.map(lambda r: work(*r), ranges))


# rows handed to a worker thread at a time, in values: small enough that a thread slowed by a
# busy core (a shared 2-core worker) leaves its share to the other, as llama.cpp's quantizer
# threads take chunks from a shared counter; big enough that dispatch costs < 1%
_CHUNK_VALUES = 1 << 18


def _ranges(nrows: int, n_per_row: int, nthread: int) -> list[tuple[int, int]]:
    """Row ranges for the worker threads. Every ggml quantizer treats rows independently, so
    the bytes do not depend on how the rows are split (llama.cpp splits them its own way)."""
    if nthread <= 1 or nrows < 2:
        return [(0, nrows)]
    per = max(1, _CHUNK_VALUES // max(n_per_row, 1), -(-16384 // max(n_per_row, 1)))  # >= llama.cpp's min chunk
    per = min(per, -(-nrows // nthread))  # every thread gets work
    return [(r, min(per, nrows - r)) for r in range(0, nrows, per)]


def quantize_rows(src: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None,
                  nthread: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize a C-contiguous float32 matrix (nrows, n_per_row) into `out` (nrows, row_bytes)
    on `nthread` threads (ctypes drops the GIL during the C call). `imatrix`: n_per_row weights
    shared by every row, as llama.cpp passes them for one 2-D slice."""
    nrows, n_per_row = src.shape
    if out is None:
        out = np.empty((nrows, row_size(ggml_type, n_per_row)), dtype=np.uint8)
    lib = _lib()
    lib.ggml_quantize_init(int(ggml_type))
    qw = imatrix.ctypes.data if imatrix is not None else None
    written = _run_chunks(lib, int(ggml_type), src, out, qw, _ranges(nrows, n_per_row, nthread), nthread)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    if not lib.ggml_validate_row_data(int(ggml_type), out.ctypes.data, out.nbytes):
        raise RuntimeError(f"ggml rejected the {type_name(ggml_type)} data it produced (NaN/inf input?)")
    return out


def dequantize(raw: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """Bytes of `n_elements` values of `ggml_type` -> float32, the way llama.cpp reads them."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if ggml_type == 0:  # F32
        return raw.view(np.float32)[:n_elements]
    if ggml_type == 30:  # BF16: the high half of a float32, exactly ggml_bf16_to_fp32_row
        return (raw.view(np.uint16)[:n_elements].astype(np.uint32) << 16).view(np.float32)
    out = np.empty(n_elements, dtype=np.float32)
    if ggml_type == 1:  # F16
        _lib().ggml_fp16_to_fp32_row(raw.ctypes.data, out.ctypes.data, n_elements)
    else:
        if n_elements % block_size(ggml_type):
            raise ValueError(f"{n_elements} values do not fill whole {type_name(ggml_type)} blocks")
        _dequantize_fn(int(ggml_type))(raw.ctypes.data, out.ctypes.data, n_elements)
    return out


__all__ = ["quantize", "quantize_rows", "dequantize", "row_size", "block_size", "type_name",
           "requires_imatrix"]
