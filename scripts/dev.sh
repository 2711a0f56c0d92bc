#!/usr/bin/env bash
# Set up one environment (.venv) for everything and run a job in it.
#
#   bash scripts/dev.sh simulate [streamline simulate options]   the main job (no GPU, no weights)
#   bash scripts/dev.sh test                                     every test suite
#
# STREAMLINE_SUITES=web,browser (any of lint, core, overhead, host, web, browser) runs only those suites.
# The web suite (node --test tests/web/, and pytest tests/web) always runs; the host suite and the
# browser suite (the memory panel in Debian's chromium, tests/host/test_browser.py) run once per
# ComfyUI host. `test` installs what those need when it is missing: node and chromium with apt-get
# (as root), the Python playwright client into the environment.
#
# The hosts are the ones tests/hosts.py finds: $COMFYUI_PATHS (colon-separated), else $COMFYUI_PATH,
# else the ComfyUI this pack sits in or ~/comfy/ComfyUI, else the reference hosts packed in
# ../shared/hosts, unpacked once into build/hosts/<version>/ComfyUI (again only when a tarball's
# sha256 changes). With CI=true the host and browser suites fail when no host is found (or a
# reference host is missing), when a host's suite runs no test, or when a test skips that
# tests/allowed_skips.txt does not list; elsewhere they say "skipped (why)".
#
# The environment pins the torch/torchvision pair ComfyUI runs with; the package itself never
# pins torch. The first host's requirements are installed too, and $COMFYUI_PATH points the core
# suite and `simulate` at that host, so the simulator's ComfyUI rows run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${STREAMLINE_VENV:-$root/.venv}
py=$venv/bin/python

is_ci() {
  case "${CI:-}" in [Tt][Rr][Uu][Ee] | 1) return 0 ;; *) return 1 ;; esac
}

find_hosts() {
  # roots: every ComfyUI host, one a line (tests/hosts.py, which unpacks the reference hosts when it
  # comes to them); hosts_why: where they came from, or why there is none; hosts_ok: 0 when none was
  # found or a reference host is missing.
  hosts_ok=1
  hosts_why=$("$py" tests/hosts.py --why) || hosts_ok=0
  roots=$("$py" tests/hosts.py 2>/dev/null) || roots=""
  echo "== hosts: $hosts_why"
}

setup() {
  local t0=$SECONDS
  if [ ! -x "$py" ]; then
    echo "== creating $venv"
    python3 -m venv "$venv"
  fi
  echo "== installing torch==2.14.1 torchvision==0.29.1 and the package"
  "$py" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
  find_hosts
  local first
  first=$(head -n 1 <<<"$roots")
  if [ -n "$first" ] && [ -z "${COMFYUI_PATH:-}" ]; then export COMFYUI_PATH=$first; fi
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

suite_result() {
  # "passed (...)", "skipped (why)" or "FAILED (why)" from a pytest JUnit XML file and pytest's exit
  # status (tests/skips.py; with CI=true a suite that ran no test, or an unlisted skip, fails).
  local ci=()
  is_ci && ci=(--ci)
  "$py" tests/skips.py "$1" "$2" "${ci[@]}" || true
}

host_version() {
  # The ComfyUI version a checkout states (comfyui_version.py), or "unknown" (as tests/hosts.py's version()).
  local v
  v=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null || true)
  echo "${v:-unknown}"
}

no_hosts() {
  # The summary line of suite $1 when no host was found (or not every reference host); with CI=true
  # the run fails.
  if is_ci; then
    status=1
    summary+=("$1: FAILED (CI=true: $hosts_why)")
  else
    summary+=("$1: skipped ($hosts_why)")
  fi
}

run_tests() {
  local status=0 t0
  summary=()
  if wanted lint; then
    t0=$SECONDS
    echo "== suite lint (ruff check, configured in pyproject.toml)"
    if "$py" -m ruff check streamlined_core nodes tests scripts __init__.py; then r=passed; else r=FAILED; status=1; fi
    summary+=("lint: $r in $((SECONDS - t0)) s")
  fi

  if wanted core; then
    t0=$SECONDS
    echo "== suite core (tests/core)"
    # $COMFYUI_PATH (the first host) lets the core suite's ComfyUI rows run, in a process of their own
    if "$py" -m pytest tests/core -q --durations=12; then r=passed; else r=FAILED; status=1; fi
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

  local n=0
  mkdir -p build/test-output
  if ! wanted host; then
    :
  elif [ -z "$roots" ]; then
    no_hosts host
  else
    [ $hosts_ok = 1 ] || no_hosts host
    while IFS= read -r c; do
      t0=$SECONDS
      n=$((n + 1))
      local version report code
      version=$(host_version "$c")
      report=build/test-output/host-$n-$version.xml
      echo "== suite host (tests/host) against ComfyUI $version at $c"
      code=0
      rm -f "build/test-output/selftest-ci-$version.txt"
      COMFYUI_PATH=$c "$py" -m pytest tests/host -q -rs --durations=15 --ignore=tests/host/test_browser.py \
        --junitxml="$report" -o junit_family=xunit1 || code=$?
      if [ -f "build/test-output/selftest-ci-$version.txt" ]; then
        # the report of the self-test's ci profile, which tests/host/test_selftest_comfyui.py ran on this host
        echo "== streamline selftest --profile ci --only comfyui --comfyui $c"
        cat "build/test-output/selftest-ci-$version.txt"
      fi
      r=$(suite_result "$report" $code)
      [[ $r == FAILED* ]] && status=1
      summary+=("host (ComfyUI $version, $c): $r in $((SECONDS - t0)) s")
    done <<<"$roots"
  fi

  n=0
  if ! wanted browser; then
    :
  elif [ -z "$roots" ]; then
    no_hosts browser
  else
    [ $hosts_ok = 1 ] || no_hosts browser
    while IFS= read -r c; do
      t0=$SECONDS
      n=$((n + 1))
      local version frontend report code
      version=$(host_version "$c")
      frontend=$(sed -n 's/^comfyui-frontend-package==//p' "$c/requirements.txt" 2>/dev/null | head -n 1 || true)
      report=build/test-output/browser-$n-$version.xml
      echo "== suite browser (tests/host/test_browser.py) against ComfyUI $version, frontend ${frontend:-unknown}"
      code=0
      COMFYUI_PATH=$c "$py" -m pytest tests/host/test_browser.py -q -rs --junitxml="$report" -o junit_family=xunit1 || code=$?
      r=$(suite_result "$report" $code)
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
