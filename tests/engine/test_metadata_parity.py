"""Every metadata key llama.cpp's convert_hf_to_gguf.py writes, we write with the same type and
value; the only keys we add are our documented provenance (converter.is_provenance_key).

The oracle is convert_hf_to_gguf.py of the llama.cpp tree llama-cpp-python 0.3.36 vendors, with
that tree's own gguf-py (newer than PyPI's gguf 0.19), as scripts/build-llama-tools.sh keeps it.
Both files are read with the project's strict reader; a pair is compared by its raw bytes (key,
value type, value), so arrays compare by content and floats exactly as written.

Our tiny test tokenizers are trained here, so llama.cpp's pre-tokenizer hash table does not know
them and its converter stops; the reference run then answers with the name of the pre-tokenizer
the fixture was built with (tests/fixtures/models.py), which our own detection must also find.
Two inputs are adjusted for both converters alike: GPT-2's config.json gets the n_ctx every real
GPT-2 config has (transformers 5 no longer writes it; llama.cpp requires it). One difference is
ours by design (quantyard/engine/gguf/vocab.py): a transformers >= 5 folder keeps its added tokens
only in tokenizer.json, which we read as transformers 4's tokenizer_config.json would list them,
so llama.cpp is given that transformers 4 folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantyard.engine.gguf.converter import is_provenance_key, write_float_gguf
from quantyard.engine.gguf.gguf_layout import KeyValue, read_layout
from quantyard.engine.hf.source import open_source
from tests.fixtures.convert_shim import CONVERT_WITH_PRE_FALLBACK
from tests.fixtures.models import ARCH_FIXTURES, _legacy_added_tokens_decoder

from ._llama_tools import PREFIX, locate_llama_tools

# the pre-tokenizer each fixture's tokenizer was built with (tests/fixtures/models.py)
FIXTURE_PRE = {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "gpt2": "gpt-2"}
PROVENANCE = {"source_sha256": "ab" * 32, "recipe_hash": "cd" * 32}


@pytest.fixture(scope="module")
def convert_script() -> Path:
    locate_llama_tools()  # waits for a build in progress; skips loudly (fails in CI) when missing
    script = PREFIX / "src" / "convert_hf_to_gguf.py"
    if not (script.is_file() and (PREFIX / "src" / "gguf-py").is_dir()):
        pytest.fail(f"{script} or its gguf-py is missing: rerun scripts/build-llama-tools.sh", pytrace=False)
    return script


def reference_gguf(script: Path, src: Path, out: Path, *, pre: str | None = None, name: str | None = None) -> Path:
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "NO_LOCAL_GGUF": "", "QY_FIXTURE_PRE": pre or ""}
    args = [sys.executable, "-c", CONVERT_WITH_PRE_FALLBACK, str(script), str(src), "--outtype", "f32", "--outfile", str(out)]
    r = subprocess.run([*args, *(["--model-name", name] if name else [])], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"convert_hf_to_gguf.py failed on {src.name}:\n{r.stderr[-3000:]}"
    return out


def _show(pair: KeyValue) -> str:
    return repr(pair.value)[:200] if pair.value is not None else f"<array of {pair.array_length}>"


def differences(reference: Path, ours: Path) -> list[str]:
    """What stops `ours` from carrying llama.cpp's metadata: keys missing or different, and extra
    keys that are not our provenance."""
    ref_kv, our_kv = read_layout(reference).kv, read_layout(ours).kv
    assert len(ref_kv) > 20 and "tokenizer.ggml.tokens" in ref_kv, "the reference wrote too little to compare"
    problems = [f"missing {key} = {_show(pair)}" for key, pair in ref_kv.items() if key not in our_kv]
    problems += [f"{key}: llama.cpp {_show(pair)}, ours {_show(our_kv[key])}"
                 for key, pair in ref_kv.items() if key in our_kv and our_kv[key].raw != pair.raw]
    problems += [f"extra {key} = {_show(pair)}" for key, pair in our_kv.items()
                 if key not in ref_kv and not is_provenance_key(key)]
    return problems


def _copy(src: Path, dest: Path) -> Path:
    """`src` copied to dest/<src's name> (the folder name feeds general.name on both sides)."""
    out = dest / src.name
    shutil.copytree(src, out)
    return out


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _inputs(src: Path, tmp: Path, edit=None) -> tuple[Path, Path]:
    """(folder llama.cpp converts, folder we convert): the same files, except that llama.cpp's
    lists the added tokens in tokenizer_config.json when a transformers 5 save left them out."""
    theirs, ours = _copy(src, tmp / "theirs"), _copy(src, tmp / "ours")
    for folder in (theirs, ours):
        if edit is not None:
            edit(folder)
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg:
            _edit_json(folder / "config.json", lambda c: c.update(n_ctx=c["n_positions"]))
    if "added_tokens_decoder" not in json.loads((theirs / "tokenizer_config.json").read_text()):
        _legacy_added_tokens_decoder(theirs)
    return theirs, ours


def _compare(script: Path, theirs: Path, ours: Path, tmp: Path, *, pre: str | None = None,
             provenance: dict | None = None) -> tuple[Path, Path]:
    name = (provenance or {}).get("name")
    ref = reference_gguf(script, theirs, tmp / "llama-cpp.gguf", pre=pre, name=name)
    mine = tmp / "quantyard.gguf"
    write_float_gguf(open_source(ours), mine, "F32", provenance=provenance)
    assert differences(ref, mine) == []
    return ref, mine


@pytest.mark.parametrize("family", ARCH_FIXTURES)
def test_fixture_metadata_equals_convert_hf_to_gguf(family, arch_models, convert_script, tmp_path):
    theirs, ours = _inputs(arch_models[family], tmp_path)
    _compare(convert_script, theirs, ours, tmp_path, pre=FIXTURE_PRE.get(family), provenance=PROVENANCE)


def test_smollm2_metadata_equals_convert_hf_to_gguf(smollm2_dir, convert_script, tmp_path):
    theirs, ours = _inputs(smollm2_dir, tmp_path)
    provenance = {**PROVENANCE, "name": "SmolLM2-135M-Instruct"}  # as `quantyard convert --name` passes it
    _, mine = _compare(convert_script, theirs, ours, tmp_path, provenance=provenance)
    kv = read_layout(mine).kv
    # llama.cpp's rule for 49152-token Llama vocabularies (SmolLM, Granite): no BOS added
    assert kv["tokenizer.ggml.add_bos_token"].value is False
    assert kv["general.name"].value == "SmolLM2-135M-Instruct"


def test_post_processor_rules_of_llama_cpp_gguf_py(arch_models, convert_script, tmp_path):
    """Where llama.cpp's gguf-py reads more than PyPI's: a ByteLevel post-processor's "no BOS/EOS"
    wins over tokenizer_config.json's add_*_token, and a Lowercase normalizer is recorded. (Qwen2
    and GPT-2 repos ship that post-processor; transformers 5 saves a TemplateProcessing instead.)"""
    def edit(folder: Path) -> None:
        _edit_json(folder / "tokenizer_config.json", lambda c: c.update(add_bos_token=True, add_eos_token=True))
        _edit_json(folder / "tokenizer.json", lambda t: t.update(
            normalizer={"type": "Sequence", "normalizers": [t["normalizer"], {"type": "Lowercase"}]},
            post_processor={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                            "use_regex": False}))

    theirs, ours = _inputs(arch_models["qwen2"], tmp_path, edit)
    _, mine = _compare(convert_script, theirs, ours, tmp_path, pre="qwen2")
    kv = read_layout(mine).kv
    assert kv["tokenizer.ggml.add_bos_token"].value is False and kv["tokenizer.ggml.add_eos_token"].value is False
    assert kv["tokenizer.ggml.normalizer.lowercase"].value is True


def test_template_bos_when_tokenizer_config_names_none(arch_models, convert_script, tmp_path):
    """A TemplateProcessing that starts every text with a token tokenizer_config.json does not
    name: llama.cpp's gguf-py takes that token as BOS and records that it is added."""
    def edit(folder: Path) -> None:
        _edit_json(folder / "tokenizer_config.json", lambda c: c.pop("bos_token", None))
        _edit_json(folder / "config.json", lambda c: c.update(bos_token_id=None))

    theirs, ours = _inputs(arch_models["llama3"], tmp_path, edit)
    _, mine = _compare(convert_script, theirs, ours, tmp_path, pre="llama-bpe")
    kv = read_layout(mine).kv
    tok = json.loads((ours / "tokenizer.json").read_text())
    begin = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|begin_of_text|>")
    assert kv["tokenizer.ggml.bos_token_id"].value == begin
    assert kv["tokenizer.ggml.add_bos_token"].value is True


CLI_TARGETS = ("F16", "Q8_0", "Q4_K_M")


@pytest.fixture(scope="module")
def cli_run(arch_models, convert_script, tmp_path_factory):
    """`quantyard convert` of a byte-level BPE source (the vocabulary path that needs
    transformers) to F16 + Q8_0 + Q4_K_M, without --name, as a user runs it; every
    AutoTokenizer.from_pretrained counted. Also llama.cpp's reference of the same folder."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from quantyard.cli import main
    from quantyard.engine.hf.tokenizer_cache import clear_tokenizers

    tmp = tmp_path_factory.mktemp("cli-name")
    theirs, ours = _inputs(arch_models["llama3"], tmp)
    ref = reference_gguf(convert_script, theirs, tmp / "llama-cpp.gguf", pre="llama-bpe")
    loads: list[str] = []
    real = AutoTokenizer.from_pretrained

    def counting(*args, **kwargs):
        loads.append(str(args[0] if args else kwargs))
        return real(*args, **kwargs)

    clear_tokenizers()  # a cold process: nothing loaded before the command
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AutoTokenizer, "from_pretrained", staticmethod(counting))
        args = ["convert", str(ours), "-o", str(tmp / "out"), "--json",
                *[a for q in CLI_TARGETS for a in ("--target", f"gguf:{q}")]]
        r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return {"ref": ref, "ours": ours, "rows": json.loads(r.stdout), "loads": loads}


def test_cli_loads_the_tokenizer_once(cli_run):
    """Vocabulary, validation of every target (and the imatrix, below) share one tokenizer."""
    assert len(cli_run["rows"]) == len(CLI_TARGETS)
    assert len(cli_run["loads"]) == 1, cli_run["loads"]


def test_cli_without_name_writes_llama_cpp_general_name(cli_run):
    """No --name: general.name is what convert_hf_to_gguf.py derives, in the float target and in
    the quantized ones (which inherit the intermediate's); files are still named after SOURCE."""
    want = read_layout(cli_run["ref"]).kv["general.name"]
    assert want.value != cli_run["ours"].name  # llama.cpp's derivation, not the folder name
    for row, q in zip(cli_run["rows"], CLI_TARGETS, strict=True):
        path = Path(row["path"])
        assert path.name == f"{cli_run['ours'].name}-{q}.gguf"
        assert read_layout(path).kv["general.name"].raw == want.raw, q


def test_imatrix_shares_the_tokenizer(arch_models, tmp_path, monkeypatch):
    """A target that wants an importance matrix adds no tokenizer load of its own."""
    from transformers import AutoTokenizer

    from quantyard.engine import parse_target
    from quantyard.engine.hf.tokenizer_cache import clear_tokenizers
    from quantyard.engine.stages import convert_many

    loads: list[object] = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        staticmethod(lambda *a, **k: loads.append(a) or real(*a, **k)))
    clear_tokenizers()
    target = parse_target({"format": "gguf", "quantization": "Q4_K_M", "params": {"imatrix": True}})
    (result,) = convert_many(_copy(arch_models["llama3"], tmp_path), [target], tmp_path / "out")
    assert result.metadata["imatrix"] and len(loads) == 1, loads


def test_provenance_keys_are_ours_only():
    """No key llama.cpp writes may pass for provenance (else the comparison above could not fail)."""
    assert is_provenance_key("general.quantized_by") and is_provenance_key("quantyard.recipe_hash")
    for key in ("general.name", "general.source.url", "tokenizer.ggml.add_bos_token", "llama.block_count"):
        assert not is_provenance_key(key)
