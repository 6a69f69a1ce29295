"""The ComfyUI tier: ComfyUI itself, in this process, on the CPU.

ComfyUI is found at $COMFYUI_PATH (default ~/ComfyUI) and imported here, at collection time,
before any test module: its folder goes first on sys.path, so `import nodes` is ComfyUI's
nodes.py and this pack's nodes/ is only ever imported as part of the pack. Without a checkout
(or when this interpreter cannot import it) every module here is reported as skipped with one
reason; STEM_REQUIRE_COMFYUI=1 turns that into an error.

Fixtures (see comfy_harness.py for the machinery):
  comfy_env        session, autouse: temp folders registered with folder_paths, core extra nodes,
                   the pack loaded from custom_nodes/ComfyUI-STEM; a namespace of paths
  stem_pack        session: the pack's module as ComfyUI loaded it
  sd15_checkpoint  session: file name of a random-weight SD1.5 checkpoint in the checkpoints folder
  run_prompt       run_prompt(prompt, *, expect_error=False, rerun=False, fresh=False, previews=None,
                   extra_data=None, auto_sink=True) -> PromptResult (or the PromptError)
  get_node_output  get_node_output(result, node_id, raw=False) -> the tuple the node returned
  progress_events  function: the ProgressRecorder, cleared, with latent2rgb previews on
  clip_8x64        session: file name (in the input folder) of an 8-frame 64x64 mp4
  make_clip        make_clip(name, frames=8, width=64, height=64, fps=8) -> file name in input dir
"""
from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # comfy_harness, whatever the import mode
import comfy_harness as H  # noqa: E402
import comfy_server  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

COMFYUI_PATH, SKIP_REASON = H.locate_and_bootstrap()
if SKIP_REASON and os.environ.get("STEM_REQUIRE_COMFYUI", "") not in ("", "0"):
    raise pytest.UsageError(f"STEM_REQUIRE_COMFYUI is set but: {SKIP_REASON}")


class _TierSkipped(pytest.Item):
    def runtest(self):
        pytest.skip(f"ComfyUI tier skipped: {SKIP_REASON}")

    def reportinfo(self):
        return self.path, None, "ComfyUI tier"


class _SkippedModule(pytest.Module):
    """Stands in for a test module when ComfyUI is absent (the module itself, which imports
    ComfyUI, is never imported). The first one yields a single item that skips with the reason,
    so the summary shows it once and pytest exits 0 (a collection-time skip would exit 5)."""

    _reported = False

    def collect(self):
        if _SkippedModule._reported:
            return []
        _SkippedModule._reported = True
        return [_TierSkipped.from_parent(self, name="comfyui_tier")]


def pytest_pycollect_makemodule(module_path, parent):
    if SKIP_REASON:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_report_header(config):
    if SKIP_REASON:
        return [f"ComfyUI tier: skipped: {SKIP_REASON}"]
    import comfyui_version
    import torch
    return [f"ComfyUI tier: ComfyUI {comfyui_version.__version__} at {COMFYUI_PATH}, torch "
            f"{torch.__version__}, CPU, {torch.get_num_threads()} threads"]


_TIMINGS: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter):
    if _TIMINGS:
        terminalreporter.write_line("ComfyUI tier setup: " + ", ".join(f"{k} {v}" for k, v in _TIMINGS.items()))


# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def comfy_env(tmp_path_factory):
    """Temp output/input/temp/user/checkpoints folders registered with folder_paths, the core extra
    nodes, the progress hook, and this repo loaded as custom_nodes/ComfyUI-STEM."""
    import comfy.utils
    import comfy.model_management
    import server

    t0 = time.perf_counter()
    base = tmp_path_factory.mktemp("comfy")
    dirs = H.configure_folders(base)
    failed_extras = H.init_comfy_nodes()
    srv = H.StubServer()
    had_instance = hasattr(server.PromptServer, "instance")
    if not had_instance:
        server.PromptServer.instance = srv  # for nodes that call PromptServer.instance.send_sync
    recorder = H.ProgressRecorder(srv)
    comfy.utils.set_progress_bar_global_hook(recorder)
    pack = H.load_pack(dirs["custom_nodes"], REPO_ROOT)
    _TIMINGS["init+pack"] = f"{time.perf_counter() - t0:.1f}s"
    env = types.SimpleNamespace(
        comfyui_path=COMFYUI_PATH, base=base, failed_extras=failed_extras, server=srv,
        recorder=recorder, pack=pack, pack_module_name=pack.__name__,
        output_dir=dirs["output"], input_dir=dirs["input"], temp_dir=dirs["temp"],
        user_dir=dirs["user"], checkpoints_dir=dirs["checkpoints"], custom_nodes_dir=dirs["custom_nodes"],
    )
    yield env
    comfy.utils.set_progress_bar_global_hook(None)
    if not had_instance:
        del server.PromptServer.instance
    comfy.model_management.unload_all_models()


@pytest.fixture(scope="session")
def stem_pack(comfy_env):
    """The pack's package module, as ComfyUI's load_custom_node registered it in sys.modules
    (under the custom_nodes folder's full path, '.' -> '_x_'). Use
    comfy_harness.pack_submodule(stem_pack, "stem.ddim") for the pack's copy of a submodule."""
    return comfy_env.pack


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_env):
    """File name (for CheckpointLoaderSimple) of the random-weight SD1.5 checkpoint."""
    name, info = H.provide_sd15_checkpoint(comfy_env.checkpoints_dir)
    _TIMINGS["checkpoint"] = (f"{'built' if info['built'] else 'cached'} in {info['seconds']:.1f}s "
                              f"({info['bytes'] / 1e9:.2f} GB, {info['path']})")
    yield name
    path = comfy_env.checkpoints_dir / name
    if not path.is_symlink():  # built without a cache: do not leave 2 GB in pytest's basetemp
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def _prompt_runner(comfy_env):
    return H.PromptRunner(comfy_env.server, comfy_env.recorder)


@pytest.fixture
def run_prompt(_prompt_runner):
    """run_prompt(prompt, *, expect_error=False, rerun=False, fresh=False, previews=None,
    extra_data=None, auto_sink=True). Validates and executes an API-format prompt with ComfyUI's
    executor; returns a PromptResult (.outputs, .get_node_output(id), .output_files(id),
    .progress, .executed_nodes, ...), raises PromptError with ComfyUI's message and traceback on
    failure, or returns it if expect_error. One executor is shared by the whole session: like a
    server it reuses the outputs of nodes whose inputs did not change since the previous prompt
    (so the checkpoint is loaded once). rerun=True runs every node again except the model
    loaders; fresh=True uses a new, empty executor (loads a second copy of the model)."""
    return _prompt_runner.run


@pytest.fixture
def get_node_output():
    """get_node_output(result, node_id, raw=False): what the node returned in that run, as a
    tuple (see PromptResult.get_node_output)."""
    def get(result, node_id, raw: bool = False):
        return result.get_node_output(node_id, raw=raw)
    return get


@pytest.fixture
def progress_events(comfy_env):
    """Every ProgressBar update during the test (ProgressRecorder: .events, .for_node(id),
    .previews, .clear(), .cancel_after(n)), with latent2rgb previews turned on."""
    rec = comfy_env.recorder
    rec.clear()
    with H.preview_method("latent2rgb"):
        yield rec
    rec.clear()


@pytest.fixture(scope="session")
def make_clip(comfy_env):
    """make_clip(name, frames=8, width=64, height=64, fps=8) writes a synthetic mp4 into ComfyUI's
    input folder and returns its name (what a video combo input takes)."""
    def make(name: str, frames: int = 8, width: int = 64, height: int = 64, fps: float = 8.0) -> str:
        H.write_video_clip(comfy_env.input_dir / name, frames, width, height, fps)
        return name
    return make


@pytest.fixture(scope="session")
def clip_8x64(make_clip):
    """An 8-frame 64x64 mp4 (moving red disc and yellow square) in the input folder: its name."""
    return make_clip("stem_clip_8x64.mp4", frames=8, width=64, height=64)


@pytest.fixture(scope="session")
def server(tmp_path_factory, comfy_env):
    """A ComfyUI server on 127.0.0.1 for the session (comfy_server.running_server): .url, .base,
    .output, .ckpt (the random checkpoint's name there), .log, .proc."""
    yield from comfy_server.running_server(tmp_path_factory.mktemp("server"), comfy_env.comfyui_path)
