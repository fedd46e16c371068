#!/usr/bin/env bash
# Build llama.cpp's reference command-line tools (llama-quantize, llama-imatrix, llama-gguf-split,
# llama-perplexity for the quality report's oracle, llama-bench for the speed oracle)
# and keep convert_hf_to_gguf.py + gguf-py, from the same llama.cpp tree that llama-cpp-python
# vendors. Tests and benchmarks compare Quantyard against these. Cached: prints the prefix.
#   usage: scripts/build-llama-tools.sh [PREFIX]   (default .test-cache/llama.cpp-<version>)
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX="${1:-$ROOT/.test-cache/llama.cpp-$VERSION}"
TOOLS="llama-quantize llama-imatrix llama-gguf-split llama-perplexity llama-bench"

# Built for this machine's CPU, as pip builds llama-cpp-python (GGML_NATIVE): the oracles then run
# the same ggml kernels as the in-process runtime. A portable (GGML_NATIVE=OFF) build evaluates a
# Q4_K_M with other SIMD paths and its perplexity differs by ~0.8% on an AVX-512 AMD EPYC.
# The cache is per machine; a prefix built with other flags is rebuilt.
FLAGS="GGML_NATIVE=ON $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12)"
built=1
for t in $TOOLS; do [ -x "$PREFIX/bin/$t" ] || built=0; done
[ "$(cat "$PREFIX/build-flags" 2>/dev/null)" = "$FLAGS" ] || built=0
if [ "$built" = 1 ] && [ -f "$PREFIX/src/convert_hf_to_gguf.py" ]; then
  echo "$PREFIX"; exit 0
fi
mkdir -p "$PREFIX"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DBUILD_SHARED_LIBS=OFF >&2
# shellcheck disable=SC2086
cmake --build "$work/build" --target $TOOLS -j "$(nproc)" >&2
mkdir -p "$PREFIX/bin"
for t in $TOOLS; do cp "$work/build/bin/$t" "$PREFIX/bin/"; done
rm -rf "$PREFIX/src" && mkdir -p "$PREFIX/src"
cp "$src/convert_hf_to_gguf.py" "$PREFIX/src/" && cp -r "$src/gguf-py" "$PREFIX/src/gguf-py"
# convert_hf_to_gguf.py imports its model classes from the conversion/ package beside it.
if [ -d "$src/conversion" ]; then cp -r "$src/conversion" "$PREFIX/src/conversion"; fi
cp -r "$src/src" "$PREFIX/src/llama-src"
echo "$FLAGS" > "$PREFIX/build-flags"
echo "$PREFIX"
