"""Prompt-processing and generation speed of a GGUF, measured the way `llama-bench` does.

llama-bench (tools/llama-bench/llama-bench.cpp in the llama.cpp that llama-cpp-python vendors)
runs two tests, each in a fresh context of n_ctx = its own token count:
  pp<N>: N random token ids (the first is BOS when the vocabulary adds one) decoded in batches
         of n_batch (2048; physical batches of n_ubatch 512), only the last token's logits;
  tg<N>: N single-token decodes, each with its logits, after an empty cache.
One warm-up run first (the whole prompt; one generated token), then `repetitions` timed runs,
the cache cleared before each; tokens/s is averaged over the runs (avg_ts) with its standard
deviation. Threads default to the physical core count (llama.cpp's common_cpu_get_num_math()).
Here the same calls run in-process through llama-cpp-python's low-level binding.

CPU "extra buffer types" (weight repacking, AMX) are llama.cpp's default and part of its speed,
so they are on, except on CPUs with AMX: there ggml's AMX buffer crashes small Q8_0 models
(llama_runtime.py), so the speed of such a worker is measured without them and says so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

N_BATCH = 2048  # llama-bench's defaults
N_UBATCH = 512
MAX_TOKENS = 16384  # a speed test is not a context-length test: caps what a job may ask
MAX_REPETITIONS = 50


@dataclass(frozen=True)
class SpeedReport:
    pp_tokens_per_s: float
    tg_tokens_per_s: float
    pp_stddev: float
    tg_stddev: float
    threads: int
    n_prompt: int
    n_gen: int
    repetitions: int
    n_batch: int
    n_ubatch: int
    extra_buffers: bool
    runtime: str

    def to_dict(self) -> dict:
        return asdict(self)


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo, as llama.cpp counts them on Linux;
    the usable CPU count elsewhere."""
    import os

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    cores, package = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            package = value.strip()
        elif key.strip() == "core id":
            cores.add((package, value.strip()))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(len(cores) or usable, usable))


def _has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _check(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, not {value!r}")
    return value


class _Bench:
    """One loaded model; contexts made per test like llama-bench's instances."""

    def __init__(self, path: Path, threads: int, extra_buffers: bool) -> None:
        import llama_cpp.llama_cpp as low

        self.low, self.threads = low, threads
        params = low.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = extra_buffers
        self.model = low.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            from ..errors import InvalidModel

            raise InvalidModel(f"llama.cpp cannot load {Path(path).name}")
        vocab = low.llama_model_get_vocab(self.model)
        self.n_vocab = low.llama_vocab_n_tokens(vocab)
        self.bos = low.llama_vocab_bos(vocab) if low.llama_vocab_get_add_bos(vocab) else None

    def context(self, n_ctx: int):
        low = self.low
        params = low.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, N_BATCH, N_UBATCH
        params.n_threads = params.n_threads_batch = self.threads
        ctx = low.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        return ctx

    def _decode(self, ctx, tokens) -> None:
        low = self.low
        arr = (low.llama_token * len(tokens))(*tokens)
        if low.llama_decode(ctx, low.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed during the speed test")

    def prompt(self, ctx, n: int, rng) -> None:
        done = 0
        while done < n:
            count = min(n - done, N_BATCH)
            tokens = [int(t) for t in rng.integers(0, self.n_vocab, count)]
            if done == 0 and self.bos is not None:
                tokens[0] = self.bos
            self._decode(ctx, tokens)
            done += count
        self.low.llama_synchronize(ctx)

    def generate(self, ctx, n: int, rng) -> None:
        token = self.bos if self.bos is not None else int(rng.integers(0, self.n_vocab))
        for _ in range(n):
            self._decode(ctx, [token])
            self.low.llama_synchronize(ctx)
            token = int(rng.integers(0, self.n_vocab))

    def run(self, kind: str, n: int, repetitions: int, rng) -> list[float]:
        """Tokens/s of each timed run (after one warm-up), fresh context for the test."""
        low, test = self.low, (self.prompt if kind == "pp" else self.generate)
        ctx = self.context(n)
        try:
            memory = low.llama_get_memory(ctx)
            test(ctx, n if kind == "pp" else 1, rng)  # warm-up
            rates = []
            for _ in range(repetitions):
                low.llama_memory_clear(memory, False)
                start = time.perf_counter_ns()
                test(ctx, n, rng)
                rates.append(1e9 * n / (time.perf_counter_ns() - start))
            return rates
        finally:
            low.llama_free(ctx)

    def close(self) -> None:
        self.low.llama_model_free(self.model)


def measure_speed(gguf_path: Path, *, threads: int | None = None, n_prompt: int = 512, n_gen: int = 128,
                  repetitions: int = 5, seed: int = 0) -> SpeedReport:
    """pp<n_prompt> and tg<n_gen> tokens/s of `gguf_path` on this machine's CPU (see module doc)."""
    import llama_cpp
    import numpy as np

    threads = physical_cores() if threads is None else _check("threads", threads, 1, 512)
    _check("n_prompt", n_prompt, 1, MAX_TOKENS)
    _check("n_gen", n_gen, 1, MAX_TOKENS)
    _check("repetitions", repetitions, 1, MAX_REPETITIONS)
    extra = not _has_amx()
    rng = np.random.default_rng(seed)
    bench = _Bench(Path(gguf_path), threads, extra)
    try:
        pp = bench.run("pp", n_prompt, repetitions, rng)
        tg = bench.run("tg", n_gen, repetitions, rng)
    finally:
        bench.close()

    def sd(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    return SpeedReport(pp_tokens_per_s=statistics.fmean(pp), tg_tokens_per_s=statistics.fmean(tg),
                       pp_stddev=sd(pp), tg_stddev=sd(tg), threads=threads, n_prompt=n_prompt, n_gen=n_gen,
                       repetitions=repetitions, n_batch=N_BATCH, n_ubatch=N_UBATCH, extra_buffers=extra,
                       runtime=f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) CPU")


__all__ = ["SpeedReport", "measure_speed", "physical_cores"]
