#!/usr/bin/env bash
# Builds the fuzz harnesses and runs each one for a bounded time:
#
#     bash tests/fuzz/run.sh SECONDS [HARNESS...]
#
# HARNESS: fuzz_unwrap, fuzz_issue, fuzz_wrap, fuzz_certs_only, fuzz_http_head (libFuzzer,
# tests/fuzz/fuzz_*.c) and fuzz_protocol (atheris); default: all six, one
# after the other. Every run is bounded by -max_total_time=SECONDS and
# -rss_limit_mb, keeps libFuzzer's leak detection on, and starts from the
# seeds that make_seeds.py writes. The exit status is non-zero if any harness
# crashed, leaked, timed out or ran out of memory; its input is kept as
# FUZZ_ARTIFACTS/<harness>-crash-... (default: build/fuzz-artifacts).
#
# Environment:
#   PYTHON          interpreter with scep-fast, cryptography, asn1crypto and
#                   atheris installed (default: python3)
#   FUZZ_RUNS       also stop each harness after this many executions
#   FUZZ_RSS_MB     memory bound per harness (default: 2048)
#   FUZZ_CORPUS     keep the corpora here (default: a temporary directory)
#   FUZZ_LOGS       keep the full logs here (default: with the corpora)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
seconds=${1:?usage: run.sh SECONDS [HARNESS...]}
shift
harnesses=("$@")
if [[ ${#harnesses[@]} -eq 0 ]]; then
    harnesses=(fuzz_unwrap fuzz_issue fuzz_wrap fuzz_certs_only fuzz_http_head fuzz_protocol)
fi
python=${PYTHON:-python3}
rss_mb=${FUZZ_RSS_MB:-2048}
artifacts=${FUZZ_ARTIFACTS:-$root/build/fuzz-artifacts}

work=$(mktemp -d "${TMPDIR:-/tmp}/scep-fast-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
corpus=${FUZZ_CORPUS:-$work/corpus}
logs=${FUZZ_LOGS:-$corpus}
mkdir -p "$artifacts" "$corpus" "$logs"

bash "$root/tests/fuzz/build.sh" "$work/bin" >/dev/null
"$python" "$root/tests/fuzz/make_seeds.py" "$work/seeds"

export ASAN_OPTIONS="detect_leaks=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

failed=()
for h in "${harnesses[@]}"; do
    case "$h" in
        fuzz_protocol) cmd=("$python" "$root/tests/fuzz/fuzz_protocol.py") ;;
        fuzz_unwrap | fuzz_issue | fuzz_wrap | fuzz_certs_only | fuzz_http_head) cmd=("$work/bin/$h") ;;
        *) echo "fuzz: unknown harness $h" >&2; exit 2 ;;
    esac
    mkdir -p "$corpus/$h"
    args=(-max_total_time="$seconds" -rss_limit_mb="$rss_mb" -timeout=30 -print_final_stats=1
          -artifact_prefix="$artifacts/$h-")
    if [[ -n "${FUZZ_RUNS:-}" ]]; then args+=(-runs="$FUZZ_RUNS"); fi
    log="$logs/$h.log"
    start=$SECONDS
    status=0
    "${cmd[@]}" "${args[@]}" "$corpus/$h" "$work/seeds/$h" >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1 || true)
    printf 'fuzz: %-16s %s executions, %s exec/s, %s, %d s' \
        "$h" "${runs:-?}" "${rate:-?}" "${cov:-cov: ?}" $((SECONDS - start))
    if [[ $status -ne 0 ]]; then
        printf ' FAILED (exit %d)\n' "$status"
        grep -E -A 30 '^==[0-9]+==ERROR|runtime error|Uncaught Python exception|^=== ' "$log" \
            | head -n 60 >&2 || tail -n 40 "$log" >&2
        failed+=("$h")
    else
        printf '\n'
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: failed: ${failed[*]}; inputs in $artifacts" >&2
    exit 1
fi
