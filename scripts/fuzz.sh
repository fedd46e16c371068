#!/usr/bin/env bash
# Long fuzzing runs of every atheris target in fuzz/ (CI runs them for seconds: tests/security/test_fuzz.py).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 300 s each, every target
#
# Each target starts from the checked-in seeds (fuzz/corpus/<target>/, read only) and grows its own
# corpus under $FUZZ_WORK (default .test-cache/fuzz/, git-ignored).
# A finding does not stop the run: the first input of each distinct finding is saved under
# $FUZZ_WORK/<target>/findings/ with its traceback (finding-*.txt). Once fixed, copy the input into
# fuzz/corpus/<target>/regress-<what> so every later run replays it. Exit status 1 if anything was found.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors_header gguf_header archive program_vetting)
fi
work=${FUZZ_WORK:-.test-cache/fuzz}
python=${PYTHON:-python3}
found=0
for t in "${targets[@]}"; do
  dir="$work/$t"
  mkdir -p "$dir/corpus" "$dir/findings" "$dir/artifacts"
  echo "== $t: ${seconds}s (corpus $dir/corpus, findings $dir/findings)"
  QUANTYARD_FUZZ_FINDINGS="$dir/findings" "$python" "fuzz/fuzz_$t.py" "$dir/corpus" "fuzz/corpus/$t" \
    -max_total_time="$seconds" -artifact_prefix="$dir/artifacts/" -print_final_stats=1 \
    >"$dir/log" 2>&1 || echo "   libFuzzer stopped early (rc $?): see $dir/log and $dir/artifacts/"
  grep -h "^FINDING" "$dir/log" | sed 's/^/   /' || true
  n=$(find "$dir/findings" -name 'finding-*.txt' | wc -l)
  crashes=$(find "$dir/artifacts" -type f | wc -l)
  echo "   $n distinct finding(s), $crashes libFuzzer artifact(s) (rss/timeout/crash)"
  if [ "$n" -gt 0 ] || [ "$crashes" -gt 0 ]; then found=1; fi
done
exit $found
