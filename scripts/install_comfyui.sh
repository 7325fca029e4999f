#!/usr/bin/env bash
# Install the ComfyUI the tests run in from upstream, when no host installer lies beside the project
# (scripts/setup_env.sh test calls it).  Usage: scripts/install_comfyui.sh DEST PYTHON NEWEST_FRONTEND
#   DEST/ComfyUI: ComfyUI v0.3.64 (a shallow git clone, without its .git), its requirements installed into
#                 PYTHON's venv except torch, torchvision and torchaudio, which the venv already has. They pin
#                 the frontend it serves by default (comfyui-frontend-package==1.27.10, from PyPI).
#   DEST/frontend-NEWEST_FRONTEND/static: that frontend version, unpacked from its PyPI wheel.
# Re-running is cheap. If the clone fails it says so in one line, with how to provide the host instead.
set -euo pipefail
DEST=$1 PY=$2 FRONTEND=$3
REPO=https://github.com/comfyanonymous/ComfyUI
TAG=v0.3.64
TREE=$DEST/ComfyUI

pip_quietly() {
  "$PY" -m pip -q "$@" 2> >(grep -v -e "is neither a file nor a directory" -e "dependency resolver does not currently" >&2)
}

mkdir -p "$DEST"
if ! grep -qs "__version__ = \"${TAG#v}\"" "$TREE/comfyui_version.py"; then
  rm -rf "$TREE"
  # lowSpeed*: give up on a stalled connection instead of waiting for the OS to time out.
  if ! err=$(GIT_TERMINAL_PROMPT=0 git -c http.lowSpeedLimit=1000 -c http.lowSpeedTime=60 \
      clone -q --depth 1 --branch "$TAG" "$REPO" "$TREE" 2>&1); then
    rm -rf "$TREE"
    reason=$(printf '%s\n' "$err" | tail -n 1 | sed 's/^fatal: //')
    echo "no ComfyUI host for the tests: git clone of $REPO $TAG failed ($reason); set SAEURON_COMFY_HOSTS to a" \
      "folder with install-comfyui.sh, or put the ComfyUI $TAG source tree in $TREE" >&2
    exit 1
  fi
  rm -rf "$TREE/.git"  # the tests copy the tree for every server they start
  echo "ComfyUI $TAG cloned into $TREE"
fi

# Installed once per venv: the stamp holds the venv it went into.
stamp=$TREE/.requirements-installed
venv=$("$PY" -c 'import sys; print(sys.prefix)')
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$venv" ]; then
  grep -vE '^(torch|torchvision|torchaudio)([^a-z0-9_-]|$)' "$TREE/requirements.txt" > "$DEST/requirements-host.txt"
  echo requests >> "$DEST/requirements-host.txt"  # ComfyUI's frontend manager imports it without listing it
  pip_quietly install -r "$DEST/requirements-host.txt"
  echo "$venv" > "$stamp"
fi

static=$DEST/frontend-$FRONTEND/static
if [ ! -f "$static/index.html" ]; then
  download=$DEST/.frontend-download
  rm -rf "$download"
  pip_quietly download --no-deps --only-binary :all: -d "$download" "comfyui-frontend-package==$FRONTEND"
  "$PY" - "$download" "$static" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

download, static = Path(sys.argv[1]), Path(sys.argv[2])
(wheel,) = download.glob("comfyui_frontend_package-*.whl")
prefix = "comfyui_frontend_package/static/"
partial = static.with_name("static.partial")
for old in (partial, static):
    shutil.rmtree(old, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    for member in zf.namelist():
        if member.startswith(prefix) and not member.endswith("/"):
            target = partial / member[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(member))
partial.replace(static)
EOF
  rm -rf "$download"
  echo "frontend $FRONTEND unpacked into $static"
fi
