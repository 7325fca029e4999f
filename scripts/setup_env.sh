#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $SAEURON_VENV) and install everything:
# the pinned CPU test torch (torch==2.14.1 torchvision==0.29.1; ComfyUI's imports need a working
# torchvision) and this package with its test extra. Re-running is cheap: it reinstalls only
# when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SAEURON_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")
NEWEST_FRONTEND=1.58.1  # the Vue frontend users run today; the host pins 1.27.10

quiet_pip() {
  # pip warns once per package about local index folders it cannot use; keep the log readable.
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v -e "is neither a file nor a directory" -e "dependency resolver does not currently" >&2)
}

# The browser tests (tests/test_browser.py, marked e2e) drive Debian's Chromium through its own
# chromedriver; nothing downloads a browser. CI runs as root and installs them here.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (apt-get) ..."
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core; } \
      >/dev/null || { echo "apt-get could not install chromium and chromium-driver" >&2; exit 1; }
  else
    echo "note: install Debian's chromium and chromium-driver for the browser tests (they are skipped without them)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.saeuron-installed"
want="$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setting up $VENV (torch ${TORCH_PINS[*]}, comfyui-saeuron[test]) ..."
  quiet_pip "${TORCH_PINS[@]}"
  quiet_pip -e ".[test]"
  echo "$want" > "$stamp"
fi

# The real ComfyUI host for the node, server and browser tests: upstream ComfyUI 0.3.64 with its pinned
# Vue frontend (and the newest frontend the page tests also drive), unpacked into .hosts/ by the installer
# that ships beside the project (../shared/hosts). Re-running is cheap.
HOSTS_DIR=${SAEURON_COMFY_HOSTS:-}
for candidate in "$HOSTS_DIR" ../shared/hosts /work/shared/hosts; do
  if [ -n "$candidate" ] && [ -f "$candidate/install-comfyui.sh" ]; then HOSTS_DIR=$candidate; break; fi
done
if [ ! -f "$HOSTS_DIR/install-comfyui.sh" ]; then
  echo "cannot find the ComfyUI host installer (install-comfyui.sh); set SAEURON_COMFY_HOSTS to its folder" >&2
  exit 1
fi
bash "$HOSTS_DIR/install-comfyui.sh" .hosts "$VENV/bin/python" "$NEWEST_FRONTEND" >/dev/null
