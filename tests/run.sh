#!/usr/bin/env bash
# The project's one test command (README, .ci/run).
#  - Where a ComfyUI checkout is found at $COMFYUI_PATH (default ~/ComfyUI) with its interpreter at
#    $COMFYUI_PYTHON (default: a venv inside or beside the checkout), both tiers run in that
#    interpreter and its torch: the unit tier (stem/, nodes' definitions, workflows) and the ComfyUI
#    tier (tests/comfyui). What it lacks for the tests (pytest; this pack's requirements where they
#    are not installed; playwright for the browser tier where Debian's chromium is installed) goes
#    into .test-deps, a folder of ours: the user's ComfyUI environment is left as it is, and no
#    torch is installed.
#  - Without a checkout, the unit tier runs in a local venv (.venv) with the CPU torch 2.13.0, and
#    the ComfyUI tier is skipped with a one-line reason.
# Extra arguments go to both pytest runs. Exits non-zero if anything fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$(pwd)
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
status=0

comfy="${COMFYUI_PATH:-$HOME/ComfyUI}"
cpy=""
if [ -f "$comfy/comfy/model_patcher.py" ]; then
  cpy="${COMFYUI_PYTHON:-}"
  if [ -z "$cpy" ]; then
    for c in "$comfy/venv/bin/python" "$comfy/.venv/bin/python" "$(dirname "$comfy")/venv/bin/python"; do
      if [ -x "$c" ]; then cpy=$c; break; fi
    done
  fi
  if [ -z "$cpy" ]; then
    echo "ComfyUI tier FAILED to start: ComfyUI is at $comfy but no interpreter was found; set COMFYUI_PYTHON"
    exit 2
  fi
fi

# what an interpreter lacks, into .test-deps: "module=requirement" pairs, each installed only where
# `import module` fails (never torch: diffusers, einops, safetensors and opencv do not pull it)
deps="$root/.test-deps"
provide() {
  local py=$1; shift
  local pair mod req
  for pair in "$@"; do
    mod=${pair%%=*}; req=${pair#*=}
    PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "import $mod" 2>/dev/null && continue
    echo "installing $req into .test-deps (missing from $py)"
    if ! "$py" -m pip install -q --disable-pip-version-check --target "$deps" "$req" >"$reports/pip.log" 2>&1; then
      if [ "$mod" = playwright ]; then echo "could not install playwright into .test-deps: the browser tier will be skipped"
      else grep -v '^WARNING' "$reports/pip.log"; echo "installing $req failed"; exit 2; fi
    fi
  done
}

if [ -n "$cpy" ]; then
  py=$cpy
  need=(pytest=pytest diffusers=diffusers einops=einops safetensors=safetensors cv2=opencv-python greenlet=greenlet)
  # the browser tier drives Debian's chromium (/usr/bin/chromium); no browser is ever downloaded
  [ -x /usr/bin/chromium ] && need+=(playwright=playwright)
  provide "$py" "${need[@]}"
  export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
else
  venv="${STEM_TEST_VENV:-.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { echo "could not create $venv with python3 -m venv"; exit 2; }
  fi
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check -q torch==2.13.0 \
       -r requirements.txt -r tests/requirements.txt >"$reports/pip.log" 2>&1; then
    grep -v '^WARNING: Location' "$reports/pip.log"; echo "installing the unit-tier dependencies failed"; exit 2
  fi
  py="$venv/bin/python"
fi

echo "== unit tier ($py, $("$py" -c 'import torch; print("torch", torch.__version__)'))"
"$py" -m pytest tests --ignore=tests/comfyui -p no:cacheprovider --junitxml="$reports/unit.xml" "$@" || status=1

if [ -n "$cpy" ]; then
  echo "== ComfyUI tier ($comfy, $cpy)"
  COMFYUI_PATH="$comfy" "$cpy" -m pytest tests/comfyui -p no:cacheprovider --junitxml="$reports/comfyui.xml" "$@" \
    || status=1
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
