"""Write the seed corpus under fuzz/corpus/<target>/ from real tiny files.

Each seed is made by the library that writes the format for real (safetensors, gguf-py,
torch.export.save / torch.jit.save, tarfile / zipfile), small enough to check in (a few KiB).
Run it again after a format change: `python fuzz/make_corpus.py`. Regression seeds (inputs that
once crashed a parser) live beside them as `regress-*` and are never rewritten here.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import zipfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
          "num_hidden_layers": 1, "vocab_size": 4}


def _safetensors(tensors: dict) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({k: np.asarray(v) for k, v in tensors.items()}, metadata={"format": "pt"})


def safetensors_seeds() -> dict[str, bytes]:
    import numpy as np

    return {
        "two-tensors.safetensors": _safetensors({"a": np.arange(8, dtype=np.float32).reshape(2, 4),
                                                 "b": np.ones(3, dtype=np.float16)}),
        "empty-tensor.safetensors": _safetensors({"z": np.zeros((0, 4), dtype=np.float32)}),
        "scalar-i64.safetensors": _safetensors({"s": np.zeros((), dtype=np.int64)}),
    }


def gguf_seeds(tmp: Path) -> dict[str, bytes]:
    import numpy as np
    from gguf import GGUFWriter

    out = {}
    for name, arrays in (("kv-and-tensor", True), ("kv-only", False)):
        path = tmp / name
        w = GGUFWriter(str(path), "llama")
        w.add_name("tiny")
        w.add_file_type(1)
        w.add_context_length(16)
        w.add_token_list(["<s>", "</s>", "a", "b"])
        w.add_array("tokenizer.ggml.scores", [0.0, 0.0, -1.0, -2.0])
        if arrays:
            w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out[name] = path.read_bytes()
    return out


def _model_files() -> dict[str, bytes]:
    import numpy as np

    return {"config.json": json.dumps(CONFIG).encode(),
            "model.safetensors": _safetensors({"w": np.ones((2, 2), dtype=np.float32)}),
            "tokenizer_config.json": b'{"model_max_length": 16}'}


def archive_seeds() -> dict[str, bytes]:
    files = _model_files()
    out = {}
    for mode, name, prefix in (("w", "model.tar", ""), ("w:gz", "model.tar.gz", "tiny/")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tf:
            if prefix:
                d = tarfile.TarInfo(prefix.rstrip("/"))
                d.type = tarfile.DIRTYPE
                tf.addfile(d)
            for n, data in files.items():
                ti = tarfile.TarInfo(prefix + n)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in files.items():
            zf.writestr(n, data)
    out["model.zip"] = buf.getvalue()
    return out


def program_seeds(tmp: Path) -> dict[str, bytes]:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()).eval()
    pt2, ts, saved = tmp / "m.pt2", tmp / "m.ts", tmp / "m.pt"
    torch.export.save(torch.export.export(model, (torch.randn(1, 2),)), pt2)
    torch.jit.save(torch.jit.script(model), ts)
    torch.save({"w": torch.ones(2)}, saved)
    return {"export.pt2": pt2.read_bytes(), "script.pt": ts.read_bytes(), "weights-only.pt": saved.read_bytes()}


def _write(target: str, seeds: dict[str, bytes]) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (folder / name).write_bytes(data)
        print(f"{folder.name}/{name}: {len(data)} bytes")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _write("safetensors_header", safetensors_seeds())
        _write("gguf_header", gguf_seeds(Path(tmp)))
        _write("archive", archive_seeds())
        _write("program_vetting", program_seeds(Path(tmp)))


if __name__ == "__main__":
    main()
