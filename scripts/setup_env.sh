#!/usr/bin/env bash
# Set up what a README command needs.  Usage: scripts/setup_env.sh [core|test]
#   core (the demo, the default): the virtual environment (.venv, or $SAEURON_VENV) with the pinned CPU test
#        torch (torch==2.14.1 torchvision==0.29.1) and this package with its diffusers extra.
#   test: the same venv with the test extra, the ComfyUI host the tests run in (.hosts/) and, run as root,
#        Debian's chromium + chromium-driver for the browser tests.
# Re-running is cheap: pip runs only when pyproject.toml or this script changed (or core was set up and test is
# asked for), and the host installers skip what is already in .hosts/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-core}
case $MODE in
  core) EXTRA="diffusers" ;;
  test) EXTRA="test" ;;
  *) echo "usage: scripts/setup_env.sh [core|test]" >&2; exit 2 ;;
esac
VENV=${SAEURON_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")  # ComfyUI's imports need a working torchvision
NEWEST_FRONTEND=1.58.1  # the Vue frontend users run today; ComfyUI 0.3.64 pins 1.27.10

quiet_pip() {
  # pip warns once per package about local index folders it cannot use; keep the log readable.
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v -e "is neither a file nor a directory" -e "dependency resolver does not currently" >&2)
}

install_browser() {
  # The browser tests (tests/test_browser.py, marked e2e) drive Debian's Chromium through its own chromedriver;
  # nothing downloads a browser. CI runs as root and gets them here.
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (apt-get) ..."
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core; } \
      >/dev/null || { echo "apt-get could not install chromium and chromium-driver" >&2; exit 1; }
  else
    echo "note: install Debian's chromium and chromium-driver for the browser tests (they are skipped without them)" >&2
  fi
}

install_python() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.saeuron-installed" want have
  want="$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
  have="$(cat "$stamp" 2>/dev/null || true)"
  # The test extra includes the diffusers extra, so a test set-up also serves the demo.
  if [ "$have" = "$want $EXTRA" ] || [ "$have" = "$want test" ]; then return; fi
  echo "setting up $VENV (${TORCH_PINS[*]}, comfyui-saeuron[$EXTRA]) ..."
  quiet_pip "${TORCH_PINS[@]}"
  quiet_pip -e ".[$EXTRA]"
  echo "$want $EXTRA" > "$stamp"
}

install_comfy_host() {
  # The real ComfyUI the node, server and browser tests run in: upstream ComfyUI 0.3.64 with its pinned frontend,
  # and frontend $NEWEST_FRONTEND beside it, in .hosts/. From the installer in $SAEURON_COMFY_HOSTS, else the one
  # shipped beside the project (../shared/hosts), else from upstream with scripts/install_comfyui.sh.
  local hosts=${SAEURON_COMFY_HOSTS:-}
  if [ -n "$hosts" ] && [ ! -f "$hosts/install-comfyui.sh" ]; then
    echo "SAEURON_COMFY_HOSTS=$hosts has no install-comfyui.sh; point it at the folder that holds it, or unset it" >&2
    exit 1
  fi
  if [ -z "$hosts" ] && [ -f ../shared/hosts/install-comfyui.sh ]; then hosts=../shared/hosts; fi
  if [ -n "$hosts" ]; then
    bash "$hosts/install-comfyui.sh" .hosts "$VENV/bin/python" "$NEWEST_FRONTEND" >/dev/null
  else
    bash scripts/install_comfyui.sh .hosts "$VENV/bin/python" "$NEWEST_FRONTEND"
  fi
}

if [ "$MODE" = test ]; then install_browser; fi
install_python
if [ "$MODE" = test ]; then install_comfy_host; fi
