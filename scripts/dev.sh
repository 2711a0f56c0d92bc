#!/usr/bin/env bash
# Set up one environment (.venv) for everything and run a job in it.
#
#   bash scripts/dev.sh simulate [streamline simulate options]   the main job (no GPU, no weights)
#   bash scripts/dev.sh test                                     every test suite
#
# STREAMLINE_SUITES=web,browser (any of core, overhead, host, web, browser) runs only those suites.
# The web suite (node --test tests/web/, and pytest tests/web) always runs; the browser suite (the
# memory panel in Debian's chromium, tests/host/test_browser.py) runs once per ComfyUI checkout found.
# `test` installs what those need when it is missing: node and chromium with apt-get (as root), the
# Python playwright client into the environment.
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

setup_web() {
  # What the web and browser suites need: node, Debian's chromium, the playwright client.
  local t0=$SECONDS apt=()
  command -v node >/dev/null || apt+=(nodejs)
  command -v chromium >/dev/null || apt+=(chromium)
  if [ ${#apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "== installing ${apt[*]} (apt-get)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt[@]}" >/dev/null \
        || echo "== apt-get could not install ${apt[*]}; the suites that need them say so"
    else
      echo "== ${apt[*]} missing and not installable here (apt-get needs root); the suites that need them say so"
    fi
  fi
  if ! "$py" -c "import playwright" 2>/dev/null; then
    echo "== installing the playwright client"
    "$py" -m pip install -q --disable-pip-version-check playwright 2> >(grep -v "is ignored: it is neither" >&2) \
      || echo "== pip could not install playwright; the browser suite says so"
  fi
  echo "== web tools ready in $((SECONDS - t0)) s: node $(node --version 2>/dev/null || echo missing), $(chromium --version 2>/dev/null || echo "chromium missing")"
}

wanted() {
  # Whether suite $1 is to run ($STREAMLINE_SUITES unset: every suite).
  [ -z "${STREAMLINE_SUITES:-}" ] || [[ ",$STREAMLINE_SUITES," == *",$1,"* ]]
}

browser_result() {
  # "passed", "FAILED" or "skipped (why)" from a pytest JUnit XML file, given pytest's exit status.
  "$py" - "$1" "$2" <<'PY'
import sys
import xml.etree.ElementTree as ET

path, code = sys.argv[1], int(sys.argv[2])
try:
    cases = list(ET.parse(path).getroot().iter("testcase"))
except (OSError, ET.ParseError) as exc:
    print(f"FAILED (no test report: {exc})")
    raise SystemExit
failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
skipped = [c.find("skipped") for c in cases if c.find("skipped") is not None]
if failed or code not in (0, 5):
    print(f"FAILED ({len(failed)} of {len(cases)} tests)")
elif cases and len(skipped) == len(cases):
    why = (skipped[0].get("message") or "").removeprefix("Skipped: ")
    print(f"skipped ({why})")
elif not cases:
    print("skipped (no tests collected)")
else:
    print(f"passed ({len(cases) - len(skipped)} tests" + (f", {len(skipped)} skipped" if skipped else "") + ")")
PY
}

run_tests() {
  local status=0 t0
  summary=()
  if wanted core; then
    t0=$SECONDS
    echo "== suite core (tests/core)"
    if "$py" -m pytest tests/core -q; then r=passed; else r=FAILED; status=1; fi
    summary+=("core: $r in $((SECONDS - t0)) s")
  fi

  if wanted overhead; then
    t0=$SECONDS
    echo "== the VRAM profiler's overhead per step (streamline profile --overhead --warmup 1 --repeats 2, mid-size; printed, not asserted)"
    if "$venv/bin/streamline" profile --overhead --warmup 1 --repeats 2; then r=printed; else r=FAILED; status=1; fi
    summary+=("profiler overhead: $r in $((SECONDS - t0)) s")
  fi

  if wanted web; then
    t0=$SECONDS
    echo "== suite web (node --test tests/web/: the panel's logic; pytest tests/web: the HTML file)"
    local web_status=0 node_r
    if command -v node >/dev/null; then
      # the test files by name: every node version reads a file list (newer ones read a folder as a glob)
      if node --test tests/web/*.test.mjs; then node_r=passed; else node_r=FAILED; web_status=1; fi
    else
      node_r="skipped (node not found; apt-get install nodejs)"
    fi
    if "$py" -m pytest tests/web -q; then r=passed; else r=FAILED; web_status=1; fi
    [ $web_status = 0 ] || status=1
    summary+=("web: node $node_r, pytest $r in $((SECONDS - t0)) s")
  fi

  local roots
  roots=$(comfy_roots || true)
  if ! wanted host; then
    :
  elif [ -z "$roots" ]; then
    summary+=("host: skipped: no ComfyUI checkout found (set COMFYUI_PATH, or put this pack in ComfyUI/custom_nodes, or unpack ComfyUI at ~/comfy/ComfyUI)")
  else
    while IFS= read -r c; do
      t0=$SECONDS
      local version
      version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$c/comfyui_version.py" 2>/dev/null || echo unknown)
      echo "== suite host (tests/host) against ComfyUI $version at $c"
      if COMFYUI_PATH=$c "$py" -m pytest tests/host -q --ignore=tests/host/test_browser.py; then r=passed; else r=FAILED; status=1; fi
      summary+=("host (ComfyUI $version, $c): $r in $((SECONDS - t0)) s")
    done <<<"$roots"
  fi

  if ! wanted browser; then
    :
  elif [ -z "$roots" ]; then
    summary+=("browser: skipped (no ComfyUI checkout found: set COMFYUI_PATH, or put this pack in ComfyUI/custom_nodes, or unpack ComfyUI at ~/comfy/ComfyUI)")
  else
    mkdir -p build/test-output
    while IFS= read -r c; do
      t0=$SECONDS
      local version frontend report code
      version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$c/comfyui_version.py" 2>/dev/null || echo unknown)
      frontend=$(sed -n 's/^comfyui-frontend-package==//p' "$c/requirements.txt" 2>/dev/null | head -n 1)
      report=build/test-output/browser-$version.xml
      echo "== suite browser (tests/host/test_browser.py) against ComfyUI $version, frontend ${frontend:-unknown}"
      code=0
      COMFYUI_PATH=$c "$py" -m pytest tests/host/test_browser.py -q -rs --junitxml="$report" || code=$?
      r=$(browser_result "$report" $code)
      [[ $r == FAILED* ]] && status=1
      summary+=("browser: $r in $((SECONDS - t0)) s (ComfyUI $version, frontend ${frontend:-unknown}, $c)")
    done <<<"$roots"
  fi
  echo
  echo "== summary"
  printf '  %s\n' "${summary[@]}"
  return $status
}

case "${1:-}" in
  simulate) shift; setup; "$venv/bin/streamline" simulate "$@" ;;
  test) shift; setup; setup_web; run_tests ;;
  *) echo "usage: bash scripts/dev.sh simulate [options] | bash scripts/dev.sh test" >&2; exit 2 ;;
esac
