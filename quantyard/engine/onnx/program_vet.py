"""Vet a .pt2 (torch.export) or TorchScript archive member by member before torch sees it.

Stdlib only (zip, JSON, regular expressions): nothing here unpickles, imports or evaluates.

What torch 2.13's torch.export.load reads, and why each is checked (torch/export/__init__.py,
torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py):

- The zip through torch's PyTorchFileReader (miniz): every record must sit under the folder of
  the first one, and names are looked up case-insensitively. So: one top folder, no duplicate
  names (exactly or ignoring case), no "..", absolute, backslash or control-character names.
  A record outside the folder makes load_pt2 raise RuntimeError, after which torch.export.load
  falls back to the pre-2.8 format (top-level `version`, `serialized_*.pt`) whose pickles it
  loads weights_only=False.
- `archive_format` ("pt2"), `archive_version`, `byteorder`, `.data/version`,
  `.data/serialization_id`: short text.
- Every `models/<name>.json` is a program (not just "model"), with `data/sample_inputs/<name>.pt`
  (torch.load weights_only=True, then weights_only=False if that fails: checked in program.py),
  `data/weights/<name>.pt` and `data/constants/<name>.pt` (legacy pickles, read *instead of*
  the configs and unpickled the same way), else `data/weights/<name>_weights_config.json` and
  `data/constants/<name>_constants_config.json`, whose entries name payload files: raw tensor
  bytes (use_pickle false), torch.load(weights_only=False) pickles (use_pickle true: tensor
  subclasses), `custom_obj_*` (TorchBind, C++ unpickler) and `opaque_obj_*` (pickle.loads).
  Only one program, named model, with raw tensors, is accepted.
- The program JSON: symbolic sizes (`expr_str`) go through sympy.sympify, i.e. Python eval:
  only symbol names, numbers, operators and torch's own sympy functions are accepted.
- `extra/*`: read as UTF-8 strings, never parsed; they must be text.
- `data/aotinductor/<name>/...`: compiled shared libraries (and their .cpp, .json) that
  load_pt2 hands to AOTIModelPackageLoader, i.e. dlopen: never accepted, nor any other part.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from pathlib import Path

from ..errors import InvalidModel

MODEL = "model"  # torch.export.save writes exactly one program under this name
PT2_FIXED = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
             f"models/{MODEL}.json", f"data/sample_inputs/{MODEL}.pt", "data/weights/model_weights_config.json",
             "data/constants/model_constants_config.json")
PAYLOAD_DIRS = {"data/weights/model_weights_config.json": ("data/weights/", re.compile(r"weight_\d+")),
                "data/constants/model_constants_config.json": ("data/constants/", re.compile(r"tensor_\d+"))}
TS_FIXED = ("data.pkl", "constants.pkl", "version", "byteorder", ".data/version", ".data/serialization_id")
TS_PATTERNS = re.compile(r"(data|constants)/\d+|code/[\w/.]+\.py(\.debug_pkl)?|extra/[^/]+|\.data/\w+")
NATIVE = re.compile(r"\.(so|so\.\d+|dylib|dll|cpp|cubin|ptx|hsaco|o|a|bin)$", re.IGNORECASE)
MAX_MEMBERS = 20_000
MAX_NAME = 512
MAX_JSON_BYTES = 256 << 20
MAX_RATIO = 200  # uncompressed / compressed for members over RATIO_FLOOR (torch stores tensors uncompressed)
RATIO_FLOOR = 16 << 20
# TorchScript operators that touch files (aten::from_file, aten::save): a program calling them
# in __setstate__ would do so while loading.
TS_FILE_OPS = re.compile(r"\b(from_file|save)\b")

# what may appear in a symbolic size: torch writes e.g. "Symbol('s77', positive=True, integer=True)"
# or "2*s0 + FloorDiv(s1, 2)"; sympify evaluates it as Python
_SYMBOL_CALL = re.compile(r"Symbol\('([a-z]+\d+)'(?:,\s*(?:positive|integer|real|nonnegative|finite)=(?:True|False))*\)")
_FLOAT_CALL = re.compile(r"Float\('[-+0-9.e]+',\s*precision=\d+\)")
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")
_IDENT = re.compile(r"[A-Za-z_]\w*")
# names and attribute paths (module FQNs: "layers.0.weight", targets: "torch.ops.aten.linear.default")
_DOTTED = re.compile(r"(?:[A-Za-z_]\w*|\d+)(?:\.(?:[A-Za-z_]\w*|\d+))*", re.ASCII)
NAME_KEYS = frozenset({"name", "target", "parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name",
                       "fqn", "forward_arg_names", "arg_name"})
_EXPR_CHARS = re.compile(r"[\w\s+\-*/%(),.<>=!&|~^]*")
# torch's own sympy functions (serialize.py's sympy_functions), sympy's, and the constructors srepr
# spells sizes with: Mul(Integer(16), Symbol('s27', positive=True, integer=True))
SYMPY_NAMES = frozenset([
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "oo",
    "Integer", "Rational", "Float", "True", "False", "true", "false", "floor", "ceiling", "sqrt", "Add", "Mul",
    "Pow", "Tuple", "Half", "One", "Zero", "NegativeOne", "Infinity", "NegativeInfinity", "BooleanTrue",
    "BooleanFalse", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality", "Unequality"
])


def refuse(path: Path, why: str, reason: str, **details) -> InvalidModel:
    return InvalidModel(f"refused {path.name}: {why}", details={"file": path.name, "reason": reason, **details})


# ---------------------------------------------------------------- the zip itself


def open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError):
        raise refuse(path, "it is not a readable zip archive", "bad_archive") from None


def archive_members(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Relative name (under the one top folder) -> entry, after the checks every reader needs."""
    infos = zf.infolist()
    if not infos or len(infos) > MAX_MEMBERS:
        raise refuse(path, f"it holds {len(infos)} members (1 to {MAX_MEMBERS} allowed)", "member_count")
    top = infos[0].filename.split("/", 1)[0]
    seen: set[str] = set()
    rel: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        _check_name(path, name)
        if name.casefold() in seen:
            raise refuse(path, f"it names {name!r} twice (torch finds members ignoring case)", "duplicate_member",
                         member=name)
        seen.add(name.casefold())
        if not name.startswith(top + "/") or name.endswith("/"):
            raise refuse(path, f"{name!r} is outside the archive's folder {top!r}/ (torch would then read the "
                         "legacy format, which unpickles without restriction)", "unexpected_part", member=name)
        big = info.file_size > RATIO_FLOOR
        if big and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise refuse(path, f"{name!r} expands {info.file_size // max(1, info.compress_size)} times "
                         "(a compression bomb)", "compression_ratio", member=name)
        rel[name[len(top) + 1:]] = info
    return rel


def _check_name(path: Path, name: str) -> None:
    parts = name.split("/")
    bad = (len(name) > MAX_NAME or name.startswith("/") or "\\" in name or ".." in parts
           or any(ord(c) < 32 or c == "\x7f" for c in name) or "" in parts[:-1] or ":" in parts[0])
    if bad:
        raise refuse(path, f"member name {name[:100]!r} is not a plain relative path", "unsafe_member_name",
                     member=name[:200])


def read_member(path: Path, zf, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes; a corrupt entry (bad CRC, truncated, bad compression) names itself."""
    if info.flag_bits & 0x1:  # zipfile would raise RuntimeError asking for a password
        raise refuse(path, f"{info.filename!r} is encrypted", "bad_archive", member=info.filename)
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError):
        raise refuse(path, f"{info.filename!r} cannot be read (a corrupt or truncated zip entry)", "bad_archive",
                     member=info.filename) from None


def _read_json(path: Path, zf, info: zipfile.ZipInfo):
    if info.file_size > MAX_JSON_BYTES:
        raise refuse(path, f"{info.filename} is {info.file_size} bytes of JSON", "too_large", member=info.filename)
    data = read_member(path, zf, info)
    try:
        return json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise refuse(path, f"{info.filename} is not valid JSON", "bad_json", member=info.filename) from None


# ---------------------------------------------------------------- torch.export archives


def _why_unexpected(part: str) -> tuple[str, str]:
    if part.startswith("data/aotinductor/") or NATIVE.search(part):
        return "compiled code (AOTInductor or other native code is never loaded)", "native_code"
    if re.fullmatch(r"data/constants/(custom|opaque)_obj_\d+", part):
        return "a pickled Python/TorchBind object, an unsafe pickle Quantyard never unpickles", "unsafe_pickle"
    if re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", part):
        return ("a legacy pickled state dict (torch.export.load would unpickle it without restriction)",
                "unsafe_pickle")
    if part.startswith("models/"):
        return "a second program (torch.export.save writes one, named model)", "unexpected_part"
    return "not part of what torch.export.save writes", "unexpected_part"


def _payloads(path: Path, zf, rel: dict, top: str) -> set[str]:
    """The raw-tensor files the two configs name; anything pickled is refused."""
    declared = set()
    for config_part, (folder, pattern) in PAYLOAD_DIRS.items():
        info = rel.get(config_part)
        if info is None:
            raise refuse(path, f"it lacks {config_part}", "missing_part", member=config_part)
        config = _read_json(path, zf, info)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise refuse(path, f"{info.filename} has no config object", "bad_json", member=info.filename)
        for fqn, meta in entries.items():
            _check_names(path, info.filename, "tensor name", fqn)  # a module attribute path when unlifting
            declared.add(_payload(path, folder, pattern, str(fqn)[:200], meta, info.filename, top))
    missing = sorted(p for p in declared if p not in rel)
    if missing:
        raise refuse(path, f"its configs name {top}/{missing[0]}, which is not in the archive", "missing_part",
                     member=f"{top}/{missing[0]}")
    return declared


def _payload(path: Path, folder: str, pattern, fqn: str, meta, config_name: str, top: str) -> str:
    folder_name = f"{top}/{folder}"
    if not isinstance(meta, dict) or not isinstance(meta.get("tensor_meta"), dict):
        file = meta.get("path_name") if isinstance(meta, dict) else None
        if isinstance(file, str) and file.startswith(("custom_obj_", "opaque_obj_")):
            raise refuse(path, f"{fqn} is a pickled Python/TorchBind object ({folder_name}{file}), an unsafe pickle "
                         "Quantyard never unpickles", "unsafe_pickle", member=folder_name + file)
        raise refuse(path, f"{config_name} entry {fqn} has no tensor_meta", "bad_json", member=config_name)
    file = meta.get("path_name")
    if meta.get("use_pickle") is not False:
        raise refuse(path, f"{fqn} is stored as a pickle ({folder_name}{file}), an unsafe pickle torch.export.load "
                     "would load with weights_only=False (tensor subclasses are not supported)", "unsafe_pickle",
                     member=f"{folder_name}{file}")
    if not isinstance(file, str) or not pattern.fullmatch(file):
        raise refuse(path, f"{config_name} entry {fqn} names the payload {str(file)[:100]!r}; torch.export.save "
                     f"names them {pattern.pattern}", "unexpected_part", member=f"{folder_name}{str(file)[:100]}")
    return folder + file


def _check_program_json(path: Path, zf, info: zipfile.ZipInfo) -> None:
    """Every symbolic size must be a plain expression over symbols (sympify evals it), every
    name and attribute path a dotted identifier (torch.fx writes them into Python it execs)."""
    stack = [_read_json(path, zf, info)]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            expr = node.get("expr_str")
            if expr is not None and not safe_sympy_expr(expr):
                raise refuse(path, f"{info.filename} has a symbolic size {str(expr)[:80]!r} that is not a plain "
                             "expression over size symbols (torch would evaluate it as Python)", "unsafe_expression",
                             member=info.filename)
            for key in NAME_KEYS.intersection(node):
                _check_names(path, info.filename, key, node[key])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _check_names(path: Path, member: str, key: str, value) -> None:
    for name in value if isinstance(value, list) else [value]:
        if not isinstance(name, str) or not (name == "" or _DOTTED.fullmatch(name)):
            raise refuse(path, f"{member} has a {key} {str(name)[:80]!r} that is not a dotted identifier (torch.fx "
                         "would write it into generated Python)", "unsafe_name", member=member)


def safe_sympy_expr(expr) -> bool:
    if not isinstance(expr, str) or len(expr) > 4096:
        return False
    rest = _FLOAT_CALL.sub("1", _SYMBOL_CALL.sub("s0", expr))
    if not _EXPR_CHARS.fullmatch(rest):
        return False  # quotes, brackets, braces, backslashes, ...
    return all(word in SYMPY_NAMES or _SYMBOL_NAME.fullmatch(word) for word in _IDENT.findall(rest))


def _check_text(path: Path, zf, info: zipfile.ZipInfo, limit: int) -> None:
    if info.file_size > limit:
        raise refuse(path, f"{info.filename} is {info.file_size} bytes", "too_large", member=info.filename)
    try:
        read_member(path, zf, info).decode("utf-8")
    except UnicodeDecodeError:
        raise refuse(path, f"{info.filename} is not UTF-8 text (torch reads extra files as text)", "unexpected_part",
                     member=info.filename) from None


def _shaped_like_save(part: str) -> bool:
    """A name torch.export.save could have written (the configs then say which payloads exist)."""
    if part in PT2_FIXED:
        return True
    if part.startswith("extra/"):
        return "/" not in part[len("extra/"):]
    return any(part.startswith(folder) and pattern.fullmatch(part[len(folder):])
               for folder, pattern in PAYLOAD_DIRS.values())


def vet_pt2_archive(path: Path) -> None:
    """InvalidModel naming the member for anything torch.export.save would not have written
    or torch.export.load would read unsafely. The sample inputs pickle is left to program.py
    (it needs torch's weights_only unpickler)."""
    with open_archive(path) as zf:
        rel = archive_members(path, zf)
        for part, info in rel.items():
            if not _shaped_like_save(part):
                why, reason = _why_unexpected(part)
                raise refuse(path, f"it holds {info.filename!r}: {why}", reason, member=info.filename)
        for part in ("archive_format", "archive_version", f"models/{MODEL}.json", f"data/sample_inputs/{MODEL}.pt"):
            if part not in rel:
                raise refuse(path, f"it lacks {part}", "missing_part", member=part)
        top = next(iter(rel.values())).filename.split("/", 1)[0]
        payloads = _payloads(path, zf, rel, top)
        for part, info in rel.items():
            if part.startswith(tuple(f for f, _ in PAYLOAD_DIRS.values())) and part not in PT2_FIXED \
                    and part not in payloads:
                raise refuse(path, f"it holds {info.filename!r}, which its configs do not name", "unexpected_part",
                             member=info.filename)
            if part in PT2_FIXED[:5] or part.startswith("extra/"):
                _check_text(path, zf, info, 256 if part in PT2_FIXED else MAX_JSON_BYTES)
        if read_member(path, zf, rel["archive_format"]).strip() != b"pt2":
            raise refuse(path, "its archive_format is not pt2", "unexpected_part", member=rel["archive_format"].filename)
        _check_program_json(path, zf, rel[f"models/{MODEL}.json"])


def sample_inputs(path: Path) -> tuple[str, bytes]:
    """The sample inputs member (vet_pt2_archive made sure there is one) and its bytes."""
    with open_archive(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(f"/data/sample_inputs/{MODEL}.pt"))
        return info.filename, read_member(path, zf, info)


# ---------------------------------------------------------------- TorchScript archives


def vet_torchscript_archive(path: Path) -> None:
    """What torch.jit.save writes, and no TorchScript code that touches files.

    torch.jit.load's unpickler (C++) builds only tensors, containers and TorchScript classes
    compiled from the archive's code/; no Python runs. That code may run while loading
    (__setstate__), so code calling file operators is refused before loading."""
    with open_archive(path) as zf:
        rel = archive_members(path, zf)
        for part, info in rel.items():
            if part in TS_FIXED or TS_PATTERNS.fullmatch(part):
                if part.startswith("code/") and part.endswith(".py"):
                    found = TS_FILE_OPS.search(read_member(path, zf, info).decode("utf-8", "replace"))
                    if found:
                        raise refuse(path, f"its TorchScript code ({info.filename}) calls {found.group(1)}, which "
                                     "reads or writes files", "file_access", member=info.filename)
                continue
            reason = "native_code" if NATIVE.search(part) else "unexpected_part"
            raise refuse(path, f"it holds {info.filename!r}, which is not part of what torch.jit.save writes",
                         reason, member=info.filename)
        if "data.pkl" not in rel:
            raise refuse(path, "it lacks data.pkl", "missing_part", member="data.pkl")


__all__ = [
    "archive_members",
    "open_archive",
    "refuse",
    "safe_sympy_expr",
    "read_member",
    "sample_inputs",
    "vet_pt2_archive",
    "vet_torchscript_archive",
]
