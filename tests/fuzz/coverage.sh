#!/usr/bin/env bash
# Line and branch coverage of native/src reached by the fuzz corpora:
#
#     bash tests/fuzz/coverage.sh CORPUS [HARNESS...]
#
# CORPUS holds one directory per harness (FUZZ_CORPUS of run.sh, or
# build/fuzz-corpus after make fuzz), which libFuzzer fills with what it found
# beyond the seeds, so the seeds are made afresh (make_seeds.py) and replayed
# too. Each libFuzzer harness is built with clang's source-based coverage and
# llvm-cov reports per harness on the core's sources. Needs Debian's llvm
# package; PYTHON as for run.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
corpus=$(cd "${1:?usage: coverage.sh CORPUS [HARNESS...]}" && pwd)
shift
harnesses=("$@")
if [[ ${#harnesses[@]} -eq 0 ]]; then
    harnesses=(fuzz_unwrap fuzz_issue fuzz_wrap fuzz_certs_only fuzz_http_head)
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/scep-fast-fuzz-cov.XXXXXX")
trap 'rm -rf "$work"' EXIT

FUZZ_COVERAGE=1 bash "$root/tests/fuzz/build.sh" "$work/bin" >/dev/null
"${PYTHON:-python3}" "$root/tests/fuzz/make_seeds.py" "$work/seeds"
for h in "${harnesses[@]}"; do
    LLVM_PROFILE_FILE="$work/$h.profraw" "$work/bin/$h" -runs=0 "$corpus/$h" "$work/seeds/$h" \
        >/dev/null 2>&1
    llvm-profdata merge -sparse "$work/$h.profraw" -o "$work/$h.profdata"
    echo "== $h ($(find "$corpus/$h" "$work/seeds/$h" -type f | wc -l) inputs)"
    llvm-cov report "$work/bin/$h" -instr-profile="$work/$h.profdata" \
        "$root"/native/src/*.c | sed "s|$root/native/src/||"
done
