#!/usr/bin/env bash
# Installs the Debian packages scep-fast needs, only those missing.
#   debian-packages.sh build        compiler, OpenSSL 3 headers, Python headers and venv
#   debian-packages.sh build test   plus the third-party SCEP peers, Prometheus and PostgreSQL the tests use,
#                                   and clang with its libFuzzer and sanitizer runtimes (tests/fuzz)
set -euo pipefail

want=()
for group in "$@"; do
    case "$group" in
        build)
            want+=(gcc libssl-dev)
            # A Python built outside Debian (pyenv, a source build) brings its own
            # headers and venv; Debian's python3 needs these two packages.
            python=${PYTHON:-python3}
            if ! "$python" -c 'import ensurepip' 2>/dev/null; then want+=(python3-venv); fi
            inc=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
            if [[ ! -f "$inc/Python.h" ]]; then want+=(python3-dev); fi
            ;;
        test) want+=(scep certmonger prometheus iproute2 openssl clang libclang-rt-14-dev postgresql
                     softhsm2 libengine-pkcs11-openssl opensc) ;;
        *) echo "debian-packages.sh: unknown group $group" >&2; exit 2 ;;
    esac
done

missing=()
for pkg in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
echo "installing Debian packages: ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
