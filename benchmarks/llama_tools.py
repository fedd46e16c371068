"""Where llama.cpp's reference tools are: llama-quantize (built by scripts/build-llama-tools.sh)
and convert_hf_to_gguf.py with the gguf-py of the same llama.cpp tree.

convert_hf_to_gguf.py imports a `conversion` package that lives next to it in the llama.cpp tree.
When the prefix made by scripts/build-llama-tools.sh lacks it, the Python side of the tree
(convert_hf_to_gguf.py, conversion/, gguf-py/) is unpacked from the same llama-cpp-python source
distribution (pip's cache) into <repo>/.test-cache/llama.cpp-<version>-py/ and used from there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _common import REPO_ROOT, ensure_repo_on_path

ensure_repo_on_path()
from tests.fixtures.cache import build_atomically, is_built  # noqa: E402

DEFAULT_VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")


@dataclass(frozen=True)
class LlamaTools:
    prefix: Path
    quantize: Path
    convert_script: Path
    gguf_py: Path
    version: str

    def convert_env(self) -> dict[str, str]:
        """convert_hf_to_gguf.py must import the gguf-py of its own tree, offline."""
        return {"PYTHONPATH": str(self.gguf_py), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "NO_LOCAL_GGUF": ""}


def default_prefix(version: str = DEFAULT_VERSION) -> Path:
    return REPO_ROOT / ".test-cache" / f"llama.cpp-{version}"


def _version_of(prefix: Path) -> str:
    m = re.search(r"llama\.cpp-(\d+\.\d+\.\d+)", prefix.name)
    return m.group(1) if m else DEFAULT_VERSION


def _python_tree_from_sdist(version: str, gguf_py: Path | None) -> Path:
    """convert_hf_to_gguf.py + conversion/ + gguf-py from the llama-cpp-python sdist (cached)."""
    dest = REPO_ROOT / ".test-cache" / f"llama.cpp-{version}-py"
    if is_built(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", work], check=True)
        sdist = next(Path(work).glob("llama_cpp_python-*.tar.gz"))
        base = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

        def unpack(tmp: Path) -> None:
            with tarfile.open(sdist) as tar:
                members = []
                for m in tar.getmembers():
                    rel = m.name[len(base):] if m.name.startswith(base) else None
                    if rel and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                        m.name = rel
                        members.append(m)
                tar.extractall(tmp, members=members, filter="data")
            if gguf_py is not None and gguf_py.is_dir():  # the very gguf-py the prefix holds
                shutil.rmtree(tmp / "gguf-py", ignore_errors=True)
                shutil.copytree(gguf_py, tmp / "gguf-py")

        build_atomically(dest, unpack, version)
    return dest


def find_llama_tools(prefix: Path | None = None, *, build: bool = False) -> LlamaTools | None:
    """The tools under `prefix` (default .test-cache/llama.cpp-<version>); None when missing.

    With build=True, runs scripts/build-llama-tools.sh first (minutes on a cold cache)."""
    prefix = Path(prefix) if prefix else default_prefix()
    if build and not (prefix / "bin" / "llama-quantize").is_file():
        out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build-llama-tools.sh"), str(prefix)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        prefix = Path(out.strip().splitlines()[-1])
    quantize = prefix / "bin" / "llama-quantize"
    src = prefix / "src"
    if not quantize.is_file() or not (src / "convert_hf_to_gguf.py").is_file():
        return None
    version = _version_of(prefix)
    if (src / "conversion").is_dir():
        tree = src
    else:
        tree = _python_tree_from_sdist(version, src / "gguf-py")
    return LlamaTools(prefix=prefix, quantize=quantize, convert_script=tree / "convert_hf_to_gguf.py",
                      gguf_py=tree / "gguf-py", version=version)
