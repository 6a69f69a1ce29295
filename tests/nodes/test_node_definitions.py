"""Every node the pack exports is a well-formed V1 node, checked without ComfyUI.

The repo is imported as a package, the way ComfyUI imports a custom node folder, so this also
proves that the root ``__init__.py`` imports without the host. A stand-in ``folder_paths``
(the only host module INPUT_TYPES reads: the file lists) points at empty temporary folders.
"""
from __future__ import annotations

import sys

import pytest

from unit_imports import PACK, load_pack, stand_in_folder_paths


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture
def fake_folder_paths(tmp_path, monkeypatch):
    fp, dirs = stand_in_folder_paths(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return dirs


def _nodes():
    return sorted(load_pack().NODE_CLASS_MAPPINGS.items())


def test_pack_imports_without_comfyui(pack):
    assert "comfy" not in sys.modules, "importing the pack imported ComfyUI"
    assert pack.NODE_CLASS_MAPPINGS, "the pack exports no nodes"


def test_the_file_nodes_are_exported(pack):
    expected = {
        "STEMLoadVideoFrames": "Load Video Frames",
        "STEMSaveInversion": "Save STEM Inversion",
        "STEMLoadInversion": "Load STEM Inversion",
    }
    for key, title in expected.items():
        assert key in pack.NODE_CLASS_MAPPINGS
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[key] == title


def test_every_node_has_a_display_name(pack):
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert all(isinstance(v, str) and v.strip() for v in pack.NODE_DISPLAY_NAME_MAPPINGS.values())


@pytest.mark.parametrize("key,cls", _nodes(), ids=[k for k, _ in _nodes()])
def test_node_definition_is_complete(key, cls, fake_folder_paths):
    common = sys.modules[f"{PACK}.nodes.host.pack"]
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40, f"{key}: DESCRIPTION missing or too short"
    assert cls.CATEGORY == common.CATEGORY
    assert callable(getattr(cls, cls.FUNCTION, None)), f"{key}: FUNCTION {cls.FUNCTION!r} is not a method"

    returns = cls.RETURN_TYPES
    assert isinstance(returns, tuple) and all(isinstance(t, str) and t for t in returns)
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
    assert isinstance(tips, tuple) and len(tips) == len(returns), f"{key}: one OUTPUT_TOOLTIP per output"
    assert all(isinstance(t, str) and t.strip() for t in tips)
    names = getattr(cls, "RETURN_NAMES", None)
    if names is not None:
        assert len(names) == len(returns) and len(set(names)) == len(names)
    if not returns:
        assert getattr(cls, "OUTPUT_NODE", False), f"{key}: a node with no outputs must be an OUTPUT_NODE"

    spec = cls.INPUT_TYPES()
    assert isinstance(spec, dict) and set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and len(entry) == 2, f"{key}.{name}: expected (type, options)"
            kind, options = entry
            assert isinstance(kind, (str, list)), f"{key}.{name}: type must be a name or a combo list"
            tip = options.get("tooltip")
            assert isinstance(tip, str) and len(tip) > 10, f"{key}.{name}: no tooltip"
            if isinstance(kind, list) and "default" in options:
                assert options["default"] in kind, f"{key}.{name}: default not among the choices"
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], f"{key}.{name}: default out of range"

    args = [a for a in spec.get("required", {})]
    code = getattr(cls, cls.FUNCTION).__code__
    params = code.co_varnames[1 : code.co_argcount]
    assert set(args) <= set(params), f"{key}: {cls.FUNCTION}() lacks parameters for {set(args) - set(params)}"
    assert set(params) <= set(args) | set(spec.get("optional", {})) | set(spec.get("hidden", {}))


def test_load_video_frames_signature(pack, fake_folder_paths):
    cls = pack.NODE_CLASS_MAPPINGS["STEMLoadVideoFrames"]
    req = cls.INPUT_TYPES()["required"]
    assert list(req) == ["video", "frame_load_cap", "skip_first_frames", "select_every_nth", "size", "crop"]
    assert req["video"][1].get("video_upload") is True
    assert req["size"][1]["default"] == 512 and req["size"][1]["step"] == 8 and req["size"][1]["min"] == 0
    assert req["crop"] == ("BOOLEAN", req["crop"][1]) and req["crop"][1]["default"] is False
    assert req["select_every_nth"][1]["default"] == 1 and req["select_every_nth"][1]["min"] == 1
    for name in ("frame_load_cap", "skip_first_frames", "select_every_nth"):
        tip = req[name][1]["tooltip"]
        assert tip.index("skip_first_frames") < tip.index("select_every_nth") < tip.rindex("frame_load_cap"), name
    assert cls.RETURN_TYPES == ("IMAGE", "INT", "FLOAT", "INT", "INT")


def test_video_list_shows_videos_and_image_folders_only(pack, fake_folder_paths):
    inp = fake_folder_paths["input"]
    for name in ("b.MP4", "a.webm", "c.gif", "d.mkv", "e.mov", "f.avi", "notes.txt", "image.png", ".hidden.mp4"):
        (inp / name).write_bytes(b"x")
    (inp / "frames").mkdir()
    (inp / "frames" / "0001.png").write_bytes(b"x")
    (inp / "empty").mkdir()
    (inp / "clipspace").mkdir()
    (inp / "clipspace" / "mask.png").write_bytes(b"x")
    combo = pack.NODE_CLASS_MAPPINGS["STEMLoadVideoFrames"].INPUT_TYPES()["required"]["video"][0]
    assert combo == ["a.webm", "b.MP4", "c.gif", "d.mkv", "e.mov", "f.avi", "frames"]


def test_save_and_load_inversion_signatures(pack, fake_folder_paths):
    save = pack.NODE_CLASS_MAPPINGS["STEMSaveInversion"]
    spec = save.INPUT_TYPES()
    assert spec["required"]["inversion"][0] == "STEM_INVERSION"
    assert spec["required"]["filename_prefix"][1]["default"] == "stem_inversion/clip"
    assert spec["optional"]["dtype"][0] == ["float32", "float16"]
    assert save.RETURN_TYPES == () and save.OUTPUT_NODE is True
    load = pack.NODE_CLASS_MAPPINGS["STEMLoadInversion"]
    assert load.RETURN_TYPES == ("STEM_INVERSION",)
    assert load.INPUT_TYPES()["required"]["inversion_file"][0] == []
