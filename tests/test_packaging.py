"""The registry's metadata agrees with what pip installs."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _names(lines) -> list[str]:
    return [re.split(r"[<>=!~;\[ ]", ln.strip(), maxsplit=1)[0].lower() for ln in lines
            if ln.strip() and not ln.strip().startswith("#")]


def test_pyproject_dependencies_are_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = _names((ROOT / "requirements.txt").read_text().splitlines())
    assert sorted(_names(project["project"]["dependencies"])) == sorted(requirements)
    assert "torch" not in requirements  # ComfyUI brings it; a plain `torch` pulls a CUDA build of GBs
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    assert "Operating System :: OS Independent" in project["project"]["classifiers"]
