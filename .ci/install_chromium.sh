#!/usr/bin/env bash
# Debian's chromium for the web demo's browser tests (tests/test_gradio_web.py). CI fails here when it cannot be
# installed: the tests would otherwise skip, which CI does not allow (tests/strict_skips.py).
#   CHROMIUM_PATH  where the browser tests look for it (default /usr/bin/chromium)
set -euo pipefail
CHROMIUM="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [[ -x "$CHROMIUM" ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no $CHROMIUM and no apt-get to install Debian's chromium (the browser tests need it)" >&2
    exit 1
fi
if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }; then
    echo "error: apt-get could not install chromium (the browser tests need it)" >&2
    exit 1
fi
if [[ ! -x "$CHROMIUM" ]]; then
    echo "error: chromium is installed but $CHROMIUM is not there (set CHROMIUM_PATH)" >&2
    exit 1
fi
