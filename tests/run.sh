#!/usr/bin/env bash
# The project's one test command (README, .ci/run).
#  1. unit tier: a local venv (.venv) with the CPU torch 2.13.0, requirements.txt and pytest;
#     everything in stem/ and the workflow checks, no ComfyUI needed.
#  2. ComfyUI tier: tests/comfyui in ComfyUI's own interpreter, where a checkout is found at
#     $COMFYUI_PATH (default ~/ComfyUI) with its interpreter at $COMFYUI_PYTHON (default: a venv
#     inside or beside the checkout). Without a checkout it is skipped with a one-line reason.
# Extra arguments go to both pytest runs. Exits non-zero if anything fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$(pwd)
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
status=0

venv="${STEM_TEST_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || { echo "could not create $venv with python3 -m venv"; exit 2; }
fi
if ! "$venv/bin/python" -m pip install --disable-pip-version-check -q torch==2.13.0 \
     -r requirements.txt -r tests/requirements.txt >"$reports/pip.log" 2>&1; then
  grep -v '^WARNING: Location' "$reports/pip.log"; echo "installing the unit-tier dependencies failed"; exit 2
fi
echo "== unit tier ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
"$venv/bin/python" -m pytest tests --ignore=tests/comfyui -p no:cacheprovider \
  --junitxml="$reports/unit.xml" "$@" || status=1

comfy="${COMFYUI_PATH:-$HOME/ComfyUI}"
if [ -f "$comfy/comfy/model_patcher.py" ]; then
  cpy="${COMFYUI_PYTHON:-}"
  if [ -z "$cpy" ]; then
    for c in "$comfy/venv/bin/python" "$comfy/.venv/bin/python" "$(dirname "$comfy")/venv/bin/python"; do
      if [ -x "$c" ]; then cpy=$c; break; fi
    done
  fi
  if [ -z "$cpy" ]; then
    echo "ComfyUI tier FAILED to start: ComfyUI is at $comfy but no interpreter was found; set COMFYUI_PYTHON"
    status=1
  else
    echo "== ComfyUI tier ($comfy, $cpy)"
    # leave the user's ComfyUI environment as it is: what it lacks goes into a folder of ours,
    # .test-deps: pytest, and playwright for the browser tier (test_browser.py) where Debian's
    # chromium is installed (it drives /usr/bin/chromium; no browser is ever downloaded)
    deps="$root/.test-deps"
    extra=""
    for mod in pytest playwright; do
      [ "$mod" = playwright ] && [ ! -x /usr/bin/chromium ] && continue
      "$cpy" -c "import $mod" 2>/dev/null && continue
      extra="$deps"
      PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" "$cpy" -c "import $mod" 2>/dev/null && continue
      if ! "$cpy" -m pip install -q --disable-pip-version-check --target "$deps" "$mod" >"$reports/pip2.log" 2>&1; then
        if [ "$mod" = pytest ]; then cat "$reports/pip2.log"; status=1
        else echo "could not install playwright into .test-deps: the browser tier will be skipped"; fi
      fi
    done
    COMFYUI_PATH="$comfy" PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}" "$cpy" -m pytest tests/comfyui \
      -p no:cacheprovider --junitxml="$reports/comfyui.xml" "$@" || status=1
  fi
else
  echo "ComfyUI tier skipped: no ComfyUI checkout at $comfy (set COMFYUI_PATH, and COMFYUI_PYTHON for its interpreter)"
fi

python3 - "$reports" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for f in glob.glob(sys.argv[1] + "/*.xml"):
    for s in ET.parse(f).getroot().iter("testsuite"):
        n, fl, er, sk = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += n - fl - er - sk; failed += fl + er; skipped += sk
print(f"total: {passed} passed, {failed} failed, {skipped} skipped")
PY
exit $status
