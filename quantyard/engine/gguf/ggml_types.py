"""GGUF tensor and file types as plain data (stdlib only, so preflight can size a target
without importing numpy or gguf). Values are ggml's and llama.cpp's enum numbers
(ggml/include/ggml.h `enum ggml_type`, include/llama.h `enum llama_ftype`)."""

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

    @property
    def is_quantized(self) -> bool:
        """ggml_is_quantized: block types; F32/F16/BF16 are not."""
        return self.name not in ("F32", "F16", "BF16")


GGML_TYPES = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("BF16", 30, 1, 2),
    GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q2_K", 10, 256, 84), GGMLType("Q3_K", 11, 256, 110), GGMLType("Q4_K", 12, 256, 144),
    GGMLType("Q5_K", 13, 256, 176), GGMLType("Q6_K", 14, 256, 210),
    GGMLType("IQ2_XXS", 16, 256, 66), GGMLType("IQ2_XS", 17, 256, 74), GGMLType("IQ3_XXS", 18, 256, 98),
    GGMLType("IQ1_S", 19, 256, 50), GGMLType("IQ4_NL", 20, 32, 18), GGMLType("IQ3_S", 21, 256, 110),
    GGMLType("IQ2_S", 22, 256, 82), GGMLType("IQ4_XS", 23, 256, 136), GGMLType("IQ1_M", 29, 256, 56),
)}
GGML_TYPES_BY_ID = {t.id: t for t in GGML_TYPES.values()}


@dataclass(frozen=True)
class FileType:
    """A target quantization: the llama_ftype number written as general.file_type, the type its
    quantizable tensors get by default (llama_ftype_get_default_type) and whether llama.cpp
    refuses to produce it without an importance matrix."""

    name: str
    llama_ftype: int
    base_type: str
    needs_imatrix: bool = False


FILE_TYPES = {f.name: f for f in (
    FileType("F32", 0, "F32"),
    FileType("F16", 1, "F16"),
    FileType("BF16", 32, "BF16"),
    FileType("Q8_0", 7, "Q8_0"),
    FileType("Q6_K", 18, "Q6_K"),
    FileType("Q5_K_M", 17, "Q5_K"),
    FileType("Q5_K_S", 16, "Q5_K"),
    FileType("Q5_1", 9, "Q5_1"),
    FileType("Q5_0", 8, "Q5_0"),
    FileType("Q4_K_M", 15, "Q4_K"),
    FileType("Q4_K_S", 14, "Q4_K"),
    FileType("Q4_1", 3, "Q4_1"),
    FileType("Q4_0", 2, "Q4_0"),
    FileType("Q3_K_L", 13, "Q3_K"),
    FileType("Q3_K_M", 12, "Q3_K"),
    FileType("Q3_K_S", 11, "Q3_K"),
    FileType("Q2_K", 10, "Q2_K"),
    FileType("Q2_K_S", 21, "Q2_K", needs_imatrix=True),
    FileType("IQ4_NL", 25, "IQ4_NL"),
    FileType("IQ4_XS", 30, "IQ4_XS"),
    FileType("IQ3_M", 27, "IQ3_S", needs_imatrix=True),
    FileType("IQ3_S", 26, "IQ3_S"),
    FileType("IQ3_XS", 22, "IQ3_S", needs_imatrix=True),
    FileType("IQ3_XXS", 23, "IQ3_XXS", needs_imatrix=True),
    FileType("IQ2_M", 29, "IQ2_S", needs_imatrix=True),
    FileType("IQ2_S", 28, "IQ2_XS", needs_imatrix=True),
    FileType("IQ2_XS", 20, "IQ2_XS", needs_imatrix=True),
    FileType("IQ2_XXS", 19, "IQ2_XXS", needs_imatrix=True),
    FileType("IQ1_M", 31, "IQ1_M", needs_imatrix=True),
    FileType("IQ1_S", 24, "IQ1_S", needs_imatrix=True),
)}
FILE_TYPES_BY_FTYPE = {f.llama_ftype: f for f in FILE_TYPES.values()}

# general.quantization_version: the ggml quantization format revision llama.cpp writes.
QUANTIZATION_VERSION = 2
# GGUF aligns every tensor's data to this many bytes (general.alignment default).
ALIGNMENT = 32

__all__ = ["GGMLType", "GGML_TYPES", "GGML_TYPES_BY_ID", "FileType", "FILE_TYPES", "FILE_TYPES_BY_FTYPE",
           "QUANTIZATION_VERSION", "ALIGNMENT"]
