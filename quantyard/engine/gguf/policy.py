"""Which ggml type each tensor gets for a target (stdlib only).

Two policies, because llama.cpp has two tools:
- `tensor_type`: what convert_hf_to_gguf writes for --outtype f32/f16/bf16/q8_0 (1-D tensors and
  norms stay F32, the rest gets the base type, falling back to F16 for rows that do not split
  into whole blocks). The HF -> GGUF converter uses it.
- `plan_types`: what llama-quantize (src/llama-quant.cpp, llama_tensor_get_type) picks for every
  tensor of an existing GGUF: mixtures (Q4_K_M, Q3_K_L, IQ2_M, ...), architecture rules (GQA,
  experts, 70B, Falcon), output/token-embedding rules, and fallbacks for odd row sizes. It works
  from the GGUF alone (tensor names, ggml shapes, arch hparams in the KV), never the HF config.
The mixture rules are ported branch by branch, in llama.cpp's order; tests/engine/test_policy.py
checks them against llama.cpp's own llama_quant_compute_types on many synthetic models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .ggml_types import FILE_TYPES, GGML_TYPES
from .tensor_types import Overrides, override_for

# ---------------------------------------------------------------------------------------------
# which tensors may be quantized at all (llama-quant.cpp tensor_allows_quantization)

# substrings that keep a tensor in its input type whatever the target
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
# whole names: learned position embeddings (GPT-2) and BERT's token types
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


def n_dims(ne: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count (a [256, 1] tensor is 1-D)."""
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization_ne(name: str, ne: Sequence[int]) -> bool:
    """llama.cpp's tensor_allows_quantization for a tensor of ggml shape `ne`."""
    if n_dims(ne) < 2 or not name.endswith("weight") or name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(marker in name for marker in _NEVER_QUANTIZED)


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """The same for a numpy `shape` (rows last, the reverse of ggml's ne)."""
    return allows_quantization_ne(name, tuple(reversed(tuple(shape))))


# ---------------------------------------------------------------------------------------------
# convert_hf_to_gguf's policy (F32/F16/BF16/Q8_0 straight from safetensors)

def _fit_row(type_name: str, row: int) -> str:
    """A type whose blocks tile a row of `row` values (convert_hf_to_gguf's F16 fallback)."""
    if row % GGML_TYPES[type_name].block_size == 0:
        return type_name
    return "F16"


def tensor_type(name: str, shape: tuple[int, ...], quantization: str) -> str:
    """ggml type name for GGUF tensor `name` of numpy `shape` (rows last) under `quantization`,
    as convert_hf_to_gguf writes it (only F32/F16/BF16/Q8_0 come straight from safetensors)."""
    base = FILE_TYPES[quantization].base_type
    if base == "F32" or not allows_quantization(name, shape):
        return "F32"
    return _fit_row(base, shape[-1])


# ---------------------------------------------------------------------------------------------
# llama-quantize's policy

@dataclass(frozen=True)
class ModelInfo:
    """The hparams llama.cpp's type choice depends on, read from a GGUF's KV."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B (attn_v gets more bits)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> "ModelInfo":
        """From GGUF KV values (`{key: python value}`, e.g. gguf_input.GGUFInput.fields)."""
        arch = str(fields.get("general.architecture", ""))

        def first(key: str, default: int = 0) -> int:
            v: Any = fields.get(f"{arch}.{key}", default)
            if isinstance(v, (list, tuple)):  # per-layer arrays: llama.cpp's n_gqa() reads layer 0
                v = v[0] if v else default
            return int(v)

        n_layer = first("block_count")
        n_head = first("attention.head_count")
        n_head_kv = first("attention.head_count_kv", n_head)
        return cls(arch=arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                   n_expert=first("expert_count"), is_70b=_is_70b(arch, n_layer, n_head, n_head_kv))


def _is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's load_hparams sets LLM_TYPE_70B for these layer counts (src/models/*.cpp)."""
    if arch == "llama":
        return n_layer == 80 and n_head != n_head_kv  # 80 layers without GQA is the 65B
    return (arch, n_layer) in {("qwen2", 80), ("deci", 80), ("olmo", 80), ("jais2", 68)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type_name: str  # the input's ggml type


_LAYER = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int:
    """Block index of `blk.N.*` tensors, -1 for the rest (sscanf("blk.%d.") in llama.cpp)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names: Iterable[str]) -> list[str]:
    """The order llama-quantize walks (and writes) tensors: its weights_map sorts by block
    number, non-block tensors first, then by name. The mixture counters depend on it."""
    return sorted(names, key=lambda n: (layer_of(n), n))


def category(name: str) -> str:
    """llama.cpp's tensor_get_category: broad roles found by name, whatever the architecture."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for marker, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                        ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                        ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                        ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if marker in name:
            return cat
    return "other"


def _is_attn_v(cat: str) -> bool:
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """First and last eighth of the layers, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# ---------------------------------------------------------------------------------------------
# llama_tensor_get_type_impl, one function per tensor role

_IQ2_FAMILY = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")  # the very-low-bit branch
_IQ2_S_OR_M = ("IQ2_S", "IQ2_M")
# types llama.cpp refuses to quantize a weight matrix to without importance data
_IMATRIX_TYPES = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")


class _Mixture:
    """llama.cpp's quantize_state_impl: the counters its rules read while walking tensors in
    llama_order. One instance per output file."""

    def __init__(self, info: ModelInfo, ftype: str, names: Sequence[str], has_imatrix: bool) -> None:
        self.info, self.ftype, self.has_imatrix = info, ftype, has_imatrix
        cats = [category(n) for n in names]
        self.n_attention_wv = sum(_is_attn_v(c) for c in cats)
        self.tied = "output" not in cats  # token_embd doubles as the output matrix
        self.n_ffn = info.n_layer  # n_ffn_down = n_ffn_gate = n_ffn_up = n_layer_all
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def layer(self, counter: int, name: str) -> int:
        """layer_info: MoE experts are not stored in layer order, so read the block number."""
        if max(1, self.info.n_expert) > 1:
            i = layer_of(name)
            if not 0 <= i < self.n_ffn:
                raise ValueError(f"cannot tell the layer of tensor {name}")
            return i
        return counter

    def choose(self, name: str, ne: Sequence[int], default: str) -> str:
        cat, ft = category(name), self.ftype
        if cat == "output" or (self.tied and cat == "token_embd"):
            return self._output(ne, default)
        if cat == "token_embd":
            return self._token_embd(default)
        if ft in _IQ2_FAMILY:
            return self._very_low_bit(cat, default)
        handler = {
            "attn_v": self._attn_v, "attn_qkv": self._attn_v, "attn_kv_b": self._attn_v,
            "attn_k": self._attn_k, "attn_q": self._attn_q, "ffn_down": self._ffn_down,
            "attn_output": self._attn_output, "ffn_gate": self._ffn_gate, "ffn_up": self._ffn_up,
        }.get(cat)
        return handler(name, default) if handler else default

    def _output(self, ne: Sequence[int], default: str) -> str:
        # nx is checked against the *default* type's block; the fallback below may still apply
        if self.info.arch == "falcon" or ne[0] % GGML_TYPES[default].block_size:
            return "Q8_0"
        if self.ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K"
        return "Q6_K" if default != "Q8_0" else default

    def _token_embd(self, default: str) -> str:
        if self.ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if self.ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        return default

    def _very_low_bit(self, cat: str, default: str) -> str:
        info, ft = self.info, self.ftype
        if _is_attn_v(cat):
            self.i_attention_wv += 1
            if info.n_gqa >= 4 or info.n_expert >= 4:
                return "Q4_K"
            return "IQ3_S" if ft in _IQ2_S_OR_M else "Q2_K"
        if info.n_expert == 8 and cat == "attn_k":
            return "Q4_K"
        if cat == "ffn_down":
            first = self.i_ffn_down < self.n_ffn // 8  # the raw counter, even for MoE
            self.i_ffn_down += 1
            if first:
                return "IQ3_S" if ft in _IQ2_S_OR_M else "Q2_K"
            return default
        if cat == "attn_output":
            if info.n_expert == 8:
                return "Q5_K"
            if ft in ("IQ1_S", "IQ1_M"):
                return "IQ2_XXS"
            if ft in _IQ2_S_OR_M:
                return "IQ3_S"
        return default

    def _attn_v(self, name: str, default: str) -> str:
        new = self._attn_v_base(default)
        if self.info.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"  # 8 heads share attn_v: more bits cost almost nothing
        if self.info.n_expert == 8:
            new = "Q8_0"
        self.i_attention_wv += 1
        return new

    def _attn_v_base(self, new: str) -> str:
        ft, gqa, i = self.ftype, self.info.n_gqa, self.i_attention_wv
        if ft == "Q2_K":
            return "Q4_K" if gqa >= 4 else "Q3_K"
        if ft == "Q2_K_S" and gqa >= 4:
            return "Q4_K"
        if ft == "IQ3_XXS":
            return "Q4_K" if gqa >= 4 else ("IQ3_XXS" if self.has_imatrix else "IQ3_S")
        if ft in ("IQ3_XS", "IQ3_S") and gqa >= 4:
            return "Q4_K"
        if ft == "IQ3_M":
            return "Q4_K"
        if ft == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if ft == "Q3_K_L":
            return "Q5_K"
        if ft in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            return "Q5_K"
        if ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, self.n_attention_wv):
            return "Q6_K"
        if ft == "Q4_K_S" and i < 4:
            return "Q5_K"
        return new

    def _attn_k(self, name: str, default: str) -> str:
        if self.info.n_expert == 8:
            return "Q8_0"
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(self.ftype, default)

    def _attn_q(self, name: str, default: str) -> str:
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(self.ftype, default)

    def _ffn_down(self, name: str, default: str) -> str:
        i, n = self.layer(self.i_ffn_down, name), self.n_ffn
        self.i_ffn_down += 1
        return self._ffn_down_type(i, n, default)

    def _ffn_down_type(self, i: int, n: int, new: str) -> str:
        ft, falcon, imat = self.ftype, self.info.arch == "falcon", self.has_imatrix
        if ft == "Q2_K":
            return "Q3_K"
        if ft == "Q2_K_S":
            return "Q4_K" if i < n // 8 else new
        if ft == "IQ3_XXS" and not imat:
            return "Q4_K" if i < n // 8 else "Q3_K"
        if ft == "Q3_K_M":
            if i < n // 16:
                return "Q5_K"
            return "Q4_K" if not falcon or use_more_bits(i, n) else "Q3_K"
        if ft == "IQ3_M" and (i < n // 8 or (self.info.n_expert == 8 and use_more_bits(i, n))):
            return "Q4_K"
        if ft == "Q3_K_L":
            return "Q4_K" if falcon else "Q5_K"
        if ft == "Q4_K_M":
            if falcon:
                return "Q6_K" if i < n // 16 else ("Q5_K" if use_more_bits(i, n) else "Q4_K")
            return "Q6_K" if use_more_bits(i, n) else new
        if i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not imat:
            return "Q5_K"
        if ft == "Q5_K_M" and use_more_bits(i, n):
            return "Q6_K"
        if ft == "Q4_K_S" and not falcon and i < n // 8:
            return "Q5_K"
        if ft in ("Q4_0", "Q5_0") and imat and i < n // 8:
            # even with an imatrix the first ffn_down layers go wild at 4/5 bits: one more bit
            return "Q4_1" if ft == "Q4_0" else "Q5_1"
        return new

    def _attn_output(self, name: str, default: str) -> str:
        ft = self.ftype
        if self.info.arch == "falcon":
            return "Q4_K" if ft == "Q3_K_L" else default
        if self.info.n_expert == 8:
            bumped = ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                      "IQ3_S", "IQ3_M", "IQ4_XS")
            return "Q5_K" if ft in bumped else default
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K",
                "IQ3_M": "Q4_K"}.get(ft, default)

    def _ffn_gate(self, name: str, default: str) -> str:
        i, n = self.layer(self.i_ffn_gate, name), self.n_ffn
        self.i_ffn_gate += 1
        return "IQ3_XXS" if self.ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8 else default

    def _ffn_up(self, name: str, default: str) -> str:
        i, n = self.layer(self.i_ffn_up, name), self.n_ffn
        self.i_ffn_up += 1
        return "IQ3_XXS" if self.ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8 else default


# tensor_type_fallback: a row that is not a whole number of blocks takes a smaller-block type
_FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def fallback(type_name: str, ncols: int) -> str:
    """The type llama.cpp writes when `ncols` is not a multiple of `type_name`'s block."""
    if ncols % GGML_TYPES[type_name].block_size == 0:
        return type_name
    new = _FALLBACK.get(type_name, type_name)  # 32-block types have nowhere smaller to go
    return new if ncols % GGML_TYPES[new].block_size == 0 else "F16"


def requires_imatrix(name: str, type_name: str, quantization: str) -> bool:
    """llama.cpp's tensor_requires_imatrix: it refuses to write this tensor without one."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return type_name in _IMATRIX_TYPES or (type_name == "Q2_K" and quantization == "Q2_K_S")


@dataclass(frozen=True)
class TensorChoice:
    name: str
    type_name: str  # the output type
    quantize: bool  # False: copied unchanged (never-quantized tensor or already that type)
    fell_back: bool  # the mixture's type did not fit the row and was replaced
    needs_imatrix: bool


def plan_types(tensors: Sequence[TensorInfo], info: ModelInfo, quantization: str, *,
               has_imatrix: bool = False, overrides: Overrides = ()) -> list[TensorChoice]:
    """llama-quantize's choice for every tensor, in llama_order (the order to write them in).
    `overrides` are --tensor-type pairs (tensor_types.parse_tensor_types): a tensor one matches
    takes its type and skips the mixture rule (whose counters then do not advance), as in
    llama.cpp; only for quantized targets (llama.cpp ignores them for F16/BF16/F32)."""
    ft = FILE_TYPES[quantization]
    default = ft.base_type
    by_name = {t.name: t for t in tensors}
    names = llama_order(by_name)
    mix = _Mixture(info, quantization, names, has_imatrix)
    out = []
    for name in names:
        t = by_name[name]
        new, fell_back = t.type_name, False
        if allows_quantization_ne(name, t.ne):
            new = default
            if GGML_TYPES[default].is_quantized:
                chosen = override_for(name, overrides) or mix.choose(name, t.ne, default)
                new = fallback(chosen, t.ne[0])
                fell_back = new != chosen
        out.append(TensorChoice(name, new, new != t.type_name, fell_back,
                                allows_quantization_ne(name, t.ne) and requires_imatrix(name, new, quantization)))
    return out


__all__ = ["allows_quantization", "allows_quantization_ne", "tensor_type", "fallback", "requires_imatrix",
           "plan_types", "TensorChoice", "ModelInfo", "TensorInfo", "layer_of", "llama_order",
           "category", "use_more_bits", "n_dims"]
