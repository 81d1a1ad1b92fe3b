#!/usr/bin/env bash
# Runs tests/native against the native core built with AddressSanitizer,
# LeakSanitizer and UndefinedBehaviorSanitizer.
#
# The sanitized module is built in a throwaway copy of the repository (tracked
# and untracked, non-ignored files), so the normal build is left alone. Run it
# from the environment the tests use (cffi, cryptography, asn1crypto, pytest):
#
#     bash tests/native/sanitize.sh [pytest arguments]
#
# PYTHON selects the interpreter (default: python3), KEEP=1 keeps the copy.
# The exit status is non-zero if any test fails, a sanitizer fires, or memory
# was leaked (see tests/native/leak_check.py for when the leak check runs).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/scep-fast-sanitize.XXXXXX")
if [[ "${KEEP:-0}" == 1 ]]; then
    echo "sanitize: keeping the copy in $work"
else
    trap 'rm -rf "$work"' EXIT
fi

# ---- a copy of the sources -----------------------------------------------------
cd "$root"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -f "$f" ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf - | tar -xf - -C "$work"
else
    tar --exclude='*.so' --exclude='*.o' --exclude=__pycache__ -cf - . | tar -xf - -C "$work"
fi
# Never pick up a module built from the normal sources.
find "$work/scep_fast" -maxdepth 1 -name '_native*.so' -delete

# ---- the sanitized build, in place ---------------------------------------------
cc=$("$python" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])')
export CC="$cc"
libasan=$("$cc" -print-file-name=libasan.so)
libubsan=$("$cc" -print-file-name=libubsan.so)
for lib in "$libasan" "$libubsan"; do
    if [[ "$lib" != /* || ! -e "$lib" ]]; then
        echo "sanitize: $cc has no ${lib##*/}; install the compiler's sanitizer runtimes" >&2
        exit 2
    fi
done

echo "sanitize: building the native module with ASan and UBSan in $work"
(
    cd "$work"
    SCEP_FAST_SANITIZE=1 "$python" - <<'EOF' >build.log 2>&1 || { cat build.log >&2; exit 1; }
import sys

sys.path.insert(0, "native")
from build_native import ffibuilder  # noqa: E402

ffibuilder.compile(tmpdir=".", verbose=True)
EOF
)
module=$(find "$work/scep_fast" -maxdepth 1 -name '_native*.so' | head -n 1)
if [[ -z "$module" ]] || ! grep -q __asan_report "$module" || ! grep -q __ubsan_handle "$module"; then
    echo "sanitize: the module was not built with the sanitizers" >&2
    exit 1
fi

# ---- the tests -----------------------------------------------------------------
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export SCEP_FAST_SANITIZED=1
export LD_PRELOAD="$libasan $libubsan${LD_PRELOAD:+ $LD_PRELOAD}"
# LeakSanitizer only sees blocks it can trace from what it scans, and it does
# not scan pymalloc's arenas: a block that only a Python object points to (a
# cffi pointer awaiting its ffi.gc destructor) would look lost. Every Python
# object comes from malloc instead.
export PYTHONMALLOC=malloc
# Leaks are checked once, at the end of the test session, by the leak_check
# plugin loaded below, not at exit (leak_check_at_exit=0): at exit CPython has
# torn itself down, and a process that leaves through os._exit skips the check.
# lsan.supp names the few one-time allocations of other libraries that are
# never freed by design; it never names the core's own functions.
leak_result="$work/leak-check.result"
export SCEP_FAST_LEAK_CHECK_RESULT="$leak_result"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export LSAN_OPTIONS="leak_check_at_exit=0:suppressions=$work/tests/native/lsan.supp:print_suppressions=1${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

cd "$work"
loaded=$("$python" -c 'import scep_fast._native as m; print(m.__file__)')
if [[ "$loaded" != "$work"/* ]]; then
    echo "sanitize: tests would import $loaded instead of the sanitized build" >&2
    exit 1
fi
echo "sanitize: running tests/native against $loaded"
# --capture=sys leaves file descriptor 2 alone, so a sanitizer report reaches the
# terminal instead of dying with pytest's captured output when the process aborts.
status=0
"$python" -m pytest tests/native -q -p no:cacheprovider --capture=sys \
    -p tests.native.leak_check "$@" || status=$?
case "$(cat "$leak_result" 2>/dev/null)" in
    clean) ;;
    leaks) echo "sanitize: LeakSanitizer found leaks (its report is above); for whole" \
                "stacks run again with LSAN_OPTIONS=fast_unwind_on_malloc=0 (slower)" >&2
           [[ $status -ne 0 ]] || status=1 ;;
    *)     echo "sanitize: the leak check did not run" >&2
           [[ $status -ne 0 ]] || status=1 ;;
esac
exit "$status"
