"""benchmarks/gpu_check.py, the prepared GPU check, run as on a GPU machine but with ``--device cpu
--tiny``: the same code (ComfyUI's model code imported from the checkout without its node loader,
the pack imported as a package of its own, every node path it times), so that it cannot rot
between the times a GPU is at hand."""
import json
import os
import subprocess
import sys
from pathlib import Path

import comfy_harness as harness

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_tiny_on_the_cpu_and_writes_its_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the test tier's
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--comfyui", harness.comfyui_path(),
                          "--device", "cpu", "--tiny", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dtype"] == "fp16" and report["tiny"]
    runs = [(r["frames"], r["run"], r["outcome"]) for r in report["nodes"]]
    for frames in (4,):
        for run in ("per-frame", "stem, one pass", f"stem, passes of {frames // 2}", "inflated", "TokenFlow Edit, 1 step"):
            assert (frames, run, "ran") in runs
    for r in report["nodes"]:
        assert r["finite"] and r["seconds"] > 0 and r["estimate_mib"] > 0
    assert {r["method"] for r in report["attention"]} == {"per-frame SDPA", "inflated", "STEM (256 bases)"}
    assert all(r["finite"] and r["ms"] > 0 for r in report["attention"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| SD1.5 | 4 | 64 | stem, passes of 2 |" in table and "estimate / peak" in table
