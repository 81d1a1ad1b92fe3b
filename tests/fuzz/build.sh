#!/usr/bin/env bash
# Builds the libFuzzer harnesses of the native core with clang, AddressSanitizer
# and UndefinedBehaviorSanitizer:
#
#     bash tests/fuzz/build.sh [OUT]       (default OUT: build/fuzz)
#
# The core is compiled with the flags of native/build_native.py (C11, -Wall
# -Wextra -Werror, OpenSSL 3 API only) plus the sanitizers and libFuzzer's
# coverage instrumentation; each tests/fuzz/fuzz_*.c becomes OUT/fuzz_*.
# CC selects the compiler (default: clang; Debian: packages clang and
# libclang-rt-14-dev). FUZZ_COVERAGE=1 builds with source-based coverage
# instead of the sanitizers, for coverage.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-$root/build/fuzz}
cc=${CC:-clang}
mkdir -p "$out/obj"

if ! command -v "$cc" >/dev/null; then
    echo "fuzz: no $cc; install clang and libclang-rt-14-dev (make test-deps does)" >&2
    exit 2
fi

cflags=(-std=c11 -Wall -Wextra -Werror -g -O1 -fno-omit-frame-pointer
        -DOPENSSL_API_COMPAT=30000 -DOPENSSL_NO_DEPRECATED
        -DSCEP_FAST_VERSION='"fuzz"' -DSCEP_FUZZ_TESTS="\"$root/tests\""
        -I"$root/native/include" -I"$root/native/src" -I"$root/tests/fuzz")
if [[ "${FUZZ_COVERAGE:-0}" == 1 ]]; then
    cflags+=(-fprofile-instr-generate -fcoverage-mapping)
else
    cflags+=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
fi

objs=()
for src in "$root"/native/src/*.c "$root"/tests/fuzz/fuzz_common.c; do
    obj="$out/obj/$(basename "${src%.c}").o"
    "$cc" "${cflags[@]}" -fsanitize=fuzzer-no-link -c "$src" -o "$obj"
    objs+=("$obj")
done
for src in "$root"/tests/fuzz/fuzz_*.c; do
    name=$(basename "${src%.c}")
    [[ "$name" == fuzz_common ]] && continue
    "$cc" "${cflags[@]}" -fsanitize=fuzzer "$src" "${objs[@]}" -lcrypto -o "$out/$name"
done
echo "fuzz: harnesses in $out"
