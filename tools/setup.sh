#!/usr/bin/env bash
# Set up a fresh machine for sortgate development, the demo and the tests:
#   - mosquitto from Debian's packages (the tests and the demo start their own on loopback),
#   - chromium from Debian's packages (the console's browser tests drive it through Playwright;
#     Playwright's own browser download is never used),
#   - a Python 3.11+ virtual environment in .venv with the project and its dev extras.
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
if ! have_mosquitto; then
    echo "setup: installing mosquitto (Debian package)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
have_mosquitto || { echo "setup: mosquitto still missing" >&2; exit 1; }

if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing chromium (Debian package, for the console's browser tests)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
command -v chromium >/dev/null 2>&1 || { echo "setup: chromium still missing" >&2; exit 1; }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            PY="$candidate"; break
        fi
    done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 or newer is required" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    "$PY" -m venv .venv
fi
stamp=".venv/.sortgate-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing sortgate and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev]"
    rm -f .venv/.sortgate-installed-*
    touch "$stamp"
fi
echo "setup: ready (mosquitto: $(command -v mosquitto || echo /usr/sbin/mosquitto), chromium: $(command -v chromium), python: $(.venv/bin/python --version))"
