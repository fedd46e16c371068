"""One Hugging Face tokenizer per source folder, loaded once and shared.

`AutoTokenizer.from_pretrained` costs seconds on a large vocabulary (about 3 s for 262k tokens),
and validating one source's targets asked for it several times per target. The cache keeps the
last few folders' tokenizers, keyed by the folder's resolved path and the size and mtime of its
files (weights excepted), so a folder edited in place is loaded afresh.

Thread-safe: a folder is loaded at most once even when several threads ask at the same time,
and `shared_tokenizer` holds the entry's lock while the caller uses it (a fast tokenizer's
backend refuses concurrent use with "Already borrowed"). Callers must not change the tokenizer
(padding, truncation, added tokens): the next user would see it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MAX_ENTRIES = 4
# Files a tokenizer never reads; they are left out of the key so a large folder stats cheaply
# and a weight file rewritten in place does not drop the tokenizer.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack",
                    ".ckpt", ".data")


def tokenizer_files_stamp(folder: Path) -> tuple:
    """(name, size, mtime) of every non-weight file the tokenizer could read, subfolders such
    as additional_chat_templates/ included."""
    entries = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES):
            st = p.stat()
            entries.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(entries)


def _load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class _Entry:
    def __init__(self) -> None:
        self.lock = threading.RLock()  # re-entrant: a holder may ask for the same folder again
        self.tokenizer: Any = None


class TokenizerCache:
    """An LRU of `max_entries` tokenizers; `loader(folder)` builds one (AutoTokenizer)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, loader: Callable[[Path], Any] = _load) -> None:
        self.max_entries, self.loader = max_entries, loader
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times the loader ran (tests count it)

    def _entry(self, folder: Path) -> _Entry:
        root = Path(folder).resolve()
        key = (str(root), tokenizer_files_stamp(root))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            self._entries.move_to_end(key)
        return entry

    @contextmanager
    def use(self, folder: Path) -> Iterator[Any]:
        """The folder's tokenizer, loaded on first use, held by this thread for the block."""
        entry = self._entry(folder)
        with entry.lock:  # also makes a second thread wait for the first one's load
            if entry.tokenizer is None:
                entry.tokenizer = self.loader(Path(folder).resolve())
                self.loads += 1
            yield entry.tokenizer

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = TokenizerCache()


def shared_tokenizer(folder: Path):
    """`with shared_tokenizer(folder) as tok:` the process-wide cached tokenizer of `folder`."""
    return _CACHE.use(folder)


def clear_tokenizers() -> None:
    _CACHE.clear()


__all__ = ["TokenizerCache", "shared_tokenizer", "clear_tokenizers", "MAX_ENTRIES"]
