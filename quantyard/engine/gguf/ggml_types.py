"""GGUF tensor and file types as plain data (stdlib only, so preflight can size a target
without importing numpy or gguf). Values are ggml's and llama.cpp's enum numbers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int  # enum ggml_type
    block_size: int  # values per block
    type_size: int  # bytes per block

    def nbytes(self, n_elements: int) -> int:
        return n_elements // self.block_size * self.type_size


GGML_TYPES = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("BF16", 30, 1, 2),
    GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q2_K", 10, 256, 84), GGMLType("Q3_K", 11, 256, 110), GGMLType("Q4_K", 12, 256, 144),
    GGMLType("Q5_K", 13, 256, 176), GGMLType("Q6_K", 14, 256, 210),
)}


@dataclass(frozen=True)
class FileType:
    """A target quantization: the llama_ftype number written as general.file_type and the
    type its quantizable tensors get."""

    name: str
    llama_ftype: int
    base_type: str


FILE_TYPES = {f.name: f for f in (
    FileType("F32", 0, "F32"),
    FileType("F16", 1, "F16"),
    FileType("Q8_0", 7, "Q8_0"),
    FileType("BF16", 32, "BF16"),
)}

# general.quantization_version: the ggml quantization format revision llama.cpp writes.
QUANTIZATION_VERSION = 2
# GGUF aligns every tensor's data to this many bytes (general.alignment default).
ALIGNMENT = 32

__all__ = ["GGMLType", "GGML_TYPES", "FileType", "FILE_TYPES", "QUANTIZATION_VERSION", "ALIGNMENT"]
