#!/usr/bin/env bash
# Create or refresh .venv with everything bevjepa needs, on a fresh Debian machine with Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

# open3d 0.20 links against libusb at import time.
if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0.so.0; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libusb-1.0-0 libgomp1 >/dev/null
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch; pyproject keeps an open range so that users elsewhere get their CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
