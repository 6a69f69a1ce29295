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


def test_readme_first_screen_is_install_edit_test():
    """The README opens with the three commands a newcomer needs: install, edit a clip with the
    command line (which must parse), and the test command CI runs (.ci/run)."""
    import shlex

    from unit_imports import load_module

    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[:3]
    assert "git clone" in blocks[0] and "pip install -r ComfyUI-STEM/requirements.txt" in blocks[0]
    words = shlex.split(blocks[1])
    assert words[:3] == ["python", "workflows/run.py", "edit"]
    run = load_module("stem_run_cli", ROOT / "workflows" / "run.py")
    args = run.make_parser().parse_args(words[2:])
    assert args.source and args.target and args.checkpoint
    assert blocks[2].strip() == "bash tests/run.sh"
    assert "exec bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()
