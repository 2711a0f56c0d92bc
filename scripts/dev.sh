#!/usr/bin/env bash
# Set up one environment (.venv) for everything and run a job in it.
#
#   bash scripts/dev.sh simulate [streamline simulate options]   the main job (no GPU, no weights)
#   bash scripts/dev.sh test                                     every test suite
#
# The environment pins the torch/torchvision pair ComfyUI runs with; the package itself never
# pins torch. When a ComfyUI checkout is found (COMFYUI_PATH, the ComfyUI this pack sits in,
# ~/comfy/ComfyUI) its requirements are installed too, so the host tests and the simulator's
# ComfyUI rows can run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${STREAMLINE_VENV:-$root/.venv}
py=$venv/bin/python

comfy_roots() {
  # Every ComfyUI checkout to test against: $COMFYUI_PATHS (colon-separated), else the one found.
  if [ -n "${COMFYUI_PATHS:-}" ]; then
    tr ':' '\n' <<<"$COMFYUI_PATHS" | sed '/^$/d'
    return
  fi
  for c in "${COMFYUI_PATH:-}" "$root/../.." "$HOME/comfy/ComfyUI"; do
    if [ -n "$c" ] && [ -f "$c/comfy/model_patcher.py" ]; then (cd "$c" && pwd); return; fi
  done
}

setup() {
  local t0=$SECONDS
  if [ ! -x "$py" ]; then
    echo "== creating $venv"
    python3 -m venv "$venv"
  fi
  echo "== installing torch==2.14.1 torchvision==0.29.1 and the package"
  "$py" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
  local first
  first=$(comfy_roots | head -n 1)
  if [ -n "$first" ] && [ -f "$first/requirements.txt" ]; then
    echo "== installing ComfyUI's requirements from $first"
    # The torch pair stays as pinned above; ComfyUI adds torchaudio and its other dependencies.
    "$py" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -r "$first/requirements.txt" 2> >(grep -v "is ignored: it is neither" >&2)
  fi
  echo "== environment ready in $((SECONDS - t0)) s"
}

run_tests() {
  local status=0 t0
  summary=()
  t0=$SECONDS
  echo "== suite core (tests/core)"
  if "$py" -m pytest tests/core -q; then r=passed; else r=FAILED; status=1; fi
  summary+=("core: $r in $((SECONDS - t0)) s")

  t0=$SECONDS
  echo "== the VRAM profiler's overhead per step (streamline profile --overhead, mid-size; printed, not asserted)"
  if "$venv/bin/streamline" profile --overhead --repeats 2; then r=printed; else r=FAILED; status=1; fi
  summary+=("profiler overhead: $r in $((SECONDS - t0)) s")

  local roots
  roots=$(comfy_roots || true)
  if [ -z "$roots" ]; then
    summary+=("host: skipped: no ComfyUI checkout found (set COMFYUI_PATH, or put this pack in ComfyUI/custom_nodes, or unpack ComfyUI at ~/comfy/ComfyUI)")
  else
    while IFS= read -r c; do
      t0=$SECONDS
      local version
      version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$c/comfyui_version.py" 2>/dev/null || echo unknown)
      echo "== suite host (tests/host) against ComfyUI $version at $c"
      if COMFYUI_PATH=$c "$py" -m pytest tests/host -q; then r=passed; else r=FAILED; status=1; fi
      summary+=("host (ComfyUI $version, $c): $r in $((SECONDS - t0)) s")
    done <<<"$roots"
  fi
  echo
  echo "== summary"
  printf '  %s\n' "${summary[@]}"
  return $status
}

case "${1:-}" in
  simulate) shift; setup; "$venv/bin/streamline" simulate "$@" ;;
  test) shift; setup; run_tests ;;
  *) echo "usage: bash scripts/dev.sh simulate [options] | bash scripts/dev.sh test" >&2; exit 2 ;;
esac
