#!/usr/bin/env bash
# Builds diffgrad's libFuzzer targets (fuzz/) with clang in their own build folder and runs each
# one after the other: N executions each (default 10^6), or a few seconds each with --smoke.
# Prints, per target: executions, crashes, sanitizer reports and libFuzzer's coverage (cov:).
# Exits non-zero when a target crashed or a sanitizer reported (the input is saved under
# <build>/fuzz-artifacts/<target>/). See docs/fuzzing.md.
#
#   tools/run_fuzzers.sh                 # every target, 10^6 executions each
#   tools/run_fuzzers.sh --runs 200000   # fewer
#   tools/run_fuzzers.sh --smoke         # each for --seconds (default 5) s: the CI smoke run
#   tools/run_fuzzers.sh --only mlp_load # one target (mlp_load, scheduler_config, scheduler_numbers)
# Environment: CXX (default clang++), BUILD_DIR (default build-fuzz), NICE (default 10), JOBS (1).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
runs=1000000
smoke=0
seconds=5
only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --seconds) seconds="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "run_fuzzers.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# An absolute path: CMake compares it with the cached compiler, and a mere spelling difference
# (clang++ vs /usr/bin/clang++) makes it wipe the cache and drop this run's -D options.
cxx="$(command -v "${CXX:-clang++}" || true)"
if [[ -z "$cxx" ]]; then
  echo "run_fuzzers.sh: no ${CXX:-clang++} on PATH (libFuzzer needs clang; Debian: clang libclang-rt-dev)" >&2
  exit 2
fi
build="${BUILD_DIR:-$root/build-fuzz}"
nice_level="${NICE:-10}"
jobs="${JOBS:-1}"
targets=(mlp_load scheduler_config scheduler_numbers)
[[ -n "$only" ]] && targets=("$only")

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
  -DDIFFGRAD_BUILD_FUZZERS=ON -DDIFFGRAD_BUILD_TESTS=OFF -DDIFFGRAD_BUILD_EXAMPLES=OFF \
  -DDIFFGRAD_BUILD_BENCHMARKS=OFF -DDIFFGRAD_INSTALL=OFF -DDIFFGRAD_ENABLE_CUDA=OFF \
  -DDIFFGRAD_WARNINGS_AS_ERRORS=ON >/dev/null
for t in "${targets[@]}"; do
  cmake --build "$build" --target "fuzz_$t" -j "$jobs" >/dev/null
done

failed=0
printf '%-20s %12s %8s %10s %6s %s\n' target executions crashes sanitizer cov seconds
for t in "${targets[@]}"; do
  exe="$build/fuzz/fuzz_$t"
  seeds="$root/fuzz/corpus/$t"
  work="$build/fuzz-corpus/$t"      # grown corpus (seeds stay untouched)
  artifacts="$build/fuzz-artifacts/$t/"
  log="$build/fuzz-logs/$t.log"
  mkdir -p "$work" "$artifacts" "$(dirname "$log")"
  if [[ $smoke -eq 1 ]]; then
    limit=(-max_total_time="$seconds")
  else
    limit=(-runs="$runs")
  fi
  start=$(date +%s)
  set +e
  nice -n "$nice_level" "$exe" "${limit[@]}" -print_final_stats=1 -artifact_prefix="$artifacts" \
    -timeout=25 -rss_limit_mb=2560 "$work" "$seeds" >"$log" 2>&1
  rc=$?
  set -e
  elapsed=$(( $(date +%s) - start ))
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}' | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  # One saved input per crash, timeout or out-of-memory (libFuzzer stops at the first).
  crashes=$(grep -c 'Test unit written to' "$log" || true)
  sanitizer=$(grep -cE 'ERROR: (AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer)|runtime error:' "$log" || true)
  printf '%-20s %12s %8s %10s %6s %s\n' "$t" "${execs:-?}" "$crashes" "$sanitizer" "${cov:-?}" "$elapsed"
  if [[ $rc -ne 0 || $crashes -ne 0 || $sanitizer -ne 0 ]]; then
    failed=1
    echo "  $t: libFuzzer exit $rc; log $log; inputs in $artifacts" >&2
    grep -E 'ERROR|runtime error|invariant|unexpected exception|#[0-9]+ 0x' "$log" | head -30 >&2 || true
  fi
done
exit $failed
