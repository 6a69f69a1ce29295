"""The bundled workflows (workflows/*.json, UI format; workflows/api/*.json, API format),
checked without ComfyUI: they are what workflows/make_workflows.py generates, they follow the
frontend's workflow schema, every node is a core node or one of ours, our widget values fit our
INPUT_TYPES, every link joins matching types, and each API file is its UI file's twin.
(tests/comfyui/test_workflows_server.py runs them on a real server.)
"""
from __future__ import annotations

import json
import sys
import types

import pytest

from unit_imports import ROOT, load_module, load_pack, stand_in_folder_paths

WF = ROOT / "workflows"


GEN = load_module("stem_make_workflows", WF / "make_workflows.py")
NAMES = sorted(GEN.WORKFLOWS)

# Core node types the workflows may use, with the number of widgets_values the frontend saves
# for each (checked against ComfyUI 0.3.64: nodes.py, comfy_extras/nodes_freelunch.py,
# nodes_images.py, nodes_video.py, nodes_primitive.py; KSampler's seed adds a control_after_generate
# value; Note is a frontend-only node with one text widget).
CORE_WIDGET_COUNTS = {
    "CheckpointLoaderSimple": 1, "CLIPTextEncode": 1, "VAEEncode": 0, "VAEDecode": 0, "FreeU": 4,
    "KSampler": 7, "ImageStitch": 4, "CreateVideo": 1, "SaveVideo": 3, "Note": 1, "PreviewImage": 0,
    "PrimitiveStringMultiline": 1,
}
VIRTUAL = {"Note"}  # not sent to the server: no API-format node
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SOCKET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The pack loaded without ComfyUI, with a stand-in folder_paths (empty folders) for the
    file-listing INPUT_TYPES."""
    fp, _ = stand_in_folder_paths(tmp_path_factory.mktemp("folders"))
    old = sys.modules.get("folder_paths")
    sys.modules["folder_paths"] = fp
    try:
        mod = load_pack()
        yield types.SimpleNamespace(
            mappings=mod.NODE_CLASS_MAPPINGS,
            input_types={k: c.INPUT_TYPES() for k, c in mod.NODE_CLASS_MAPPINGS.items()},
        )
    finally:
        if old is None:
            sys.modules.pop("folder_paths", None)
        else:
            sys.modules["folder_paths"] = old


def ui(name):
    return json.loads((WF / f"{name}.json").read_text(encoding="utf-8"))


def api(name):
    return json.loads((WF / "api" / f"{name}.json").read_text(encoding="utf-8"))


def _specs(input_types: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, kind, options, optional) in the order the frontend builds widgets."""
    out = []
    for section, optional in (("required", False), ("optional", True)):
        for name, spec in (input_types.get(section) or {}).items():
            out.append((name, spec[0], (spec[1] if len(spec) > 1 else None) or {}, optional))
    return out


def _is_widget(kind, opts) -> bool:
    return (isinstance(kind, list) or kind in SOCKET_KINDS) and not opts.get("forceInput")


# ----------------------------------------------------------------------------------------------


def test_committed_files_are_the_generators_output():
    expected = GEN.expected_files()
    for path, text in expected.items():
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run python workflows/make_workflows.py"
        assert path.read_text(encoding="utf-8") == text, \
            f"{path.relative_to(ROOT)} differs from make_workflows.py's output: edit the generator and rerun it"
    present = set(WF.glob("*.json")) | set((WF / "api").glob("*.json"))
    assert present == set(expected), f"stray workflow files: {sorted(map(str, present - set(expected)))}"
    assert GEN.main(["--check"]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_ui_format_follows_the_frontend_schema(name):
    """The parts of the frontend's zComfyWorkflow (1.27.10) that a hand-written file can get wrong."""
    wf = ui(name)
    assert isinstance(wf["last_node_id"], int) and isinstance(wf["last_link_id"], int)
    assert wf["version"] == 0.4
    assert isinstance(wf["groups"], list) and isinstance(wf["config"], dict) and isinstance(wf["extra"], dict)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    orders = sorted(n["order"] for n in wf["nodes"])
    assert orders == list(range(len(ids)))
    for n in wf["nodes"]:
        for key, kind in (("id", int), ("type", str), ("flags", dict), ("order", int), ("mode", int),
                          ("properties", dict), ("widgets_values", list), ("inputs", list), ("outputs", list)):
            assert isinstance(n[key], kind), f"node {n.get('id')}: {key}"
        for key in ("pos", "size"):
            assert len(n[key]) == 2 and all(isinstance(v, (int, float)) for v in n[key])
        assert n["mode"] == 0
        if n["type"] not in VIRTUAL:
            assert n["properties"]["Node name for S&R"] == n["type"]
        for i in n["inputs"]:
            assert isinstance(i["name"], str) and isinstance(i["type"], str)
            assert i["link"] is None or isinstance(i["link"], int)
        for o in n["outputs"]:
            assert isinstance(o["name"], str) and isinstance(o["type"], str) and isinstance(o["links"], list)
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and wf["last_link_id"] >= max(link_ids)
    for link in wf["links"]:
        assert len(link) == 6 and all(isinstance(v, int) for v in link[:5]) and isinstance(link[5], str)


@pytest.mark.parametrize("name", NAMES)
def test_every_node_is_core_or_ours(name, pack):
    for n in ui(name)["nodes"]:
        assert n["type"] in CORE_WIDGET_COUNTS or n["type"] in pack.mappings, f"unknown node type {n['type']}"
    for type_, t in GEN.NODE_TYPES.items():
        assert (type_ in pack.mappings) == (not t.core), type_
        assert type_ in pack.mappings or type_ in CORE_WIDGET_COUNTS, type_


def test_generator_tables_match_our_input_types(pack):
    """make_workflows.py's widgets, sockets and outputs for our nodes are INPUT_TYPES'."""
    for type_, t in GEN.NODE_TYPES.items():
        if t.core:
            continue
        specs = _specs(pack.input_types[type_])
        assert tuple(s[0] for s in specs if _is_widget(s[1], s[2])) == t.widgets, type_
        assert tuple((s[0], s[1], s[3]) for s in specs if not _is_widget(s[1], s[2])) == t.sockets, type_
        cls = pack.mappings[type_]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        assert tuple(zip(names, cls.RETURN_TYPES)) == t.outputs, type_
        controls = tuple(s[0] for s in specs if s[1] == "INT" and (s[0] in ("seed", "noise_seed")
                                                                   or s[2].get("control_after_generate")))
        assert controls == t.control_after, type_
        assert t.upload == any(s[2].get("video_upload") or s[2].get("image_upload") for s in specs), type_


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_fit_the_node_definitions(name, pack):
    for n in ui(name)["nodes"]:
        values = list(n["widgets_values"])
        if n["type"] not in pack.mappings:
            assert len(values) == CORE_WIDGET_COUNTS[n["type"]], f"{n['type']} {n['id']}: {values}"
            continue
        where = f"{name}: {n['type']} (node {n['id']})"
        upload = False
        for wname, kind, opts, _ in _specs(pack.input_types[n["type"]]):
            if not _is_widget(kind, opts):
                continue
            assert values, f"{where}: no value for {wname}"
            v = values.pop(0)
            if kind == "INT":
                assert isinstance(v, int) and not isinstance(v, bool), f"{where}: {wname}={v!r}"
                assert opts.get("min", -2**63) <= v <= opts.get("max", 2**64), f"{where}: {wname}={v} out of range"
                if wname in ("seed", "noise_seed") or opts.get("control_after_generate"):
                    assert values and values.pop(0) in CONTROL_VALUES, f"{where}: {wname} lacks its control value"
            elif kind == "FLOAT":
                assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{where}: {wname}={v!r}"
                assert opts.get("min", float("-inf")) <= v <= opts.get("max", float("inf")), f"{where}: {wname}={v}"
            elif kind == "BOOLEAN":
                assert isinstance(v, bool), f"{where}: {wname}={v!r}"
            elif kind == "STRING":
                assert isinstance(v, str), f"{where}: {wname}={v!r}"
            elif opts.get("video_upload"):
                upload = True  # the file list depends on the user's input folder
                assert isinstance(v, str) and v.lower().endswith(
                    (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif")), f"{where}: {wname}={v!r}"
            else:
                assert v in kind, f"{where}: {wname}={v!r} is not one of {kind}"
        if upload:
            assert values == ["image"], f"{where}: the upload widget's value should close the list: {values}"
        else:
            assert values == [], f"{where}: {len(values)} values too many: {values}"


@pytest.mark.parametrize("name", NAMES)
def test_links_join_matching_types(name):
    wf = ui(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    by_id = {link[0]: link for link in wf["links"]}
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        out = nodes[src]["outputs"][sslot]
        inp = nodes[dst]["inputs"][dslot]
        assert lid in out["links"] and inp["link"] == lid, f"link {lid} is not recorded on both ends"
        assert out["type"] == typ and inp["type"] in (typ, "*"), f"link {lid}: {out['type']} -> {inp['type']} ({typ})"
    for n in wf["nodes"]:
        for i in n["inputs"]:
            assert i["link"] is None or by_id[i["link"]][3] == n["id"]
        for o in n["outputs"]:
            assert all(by_id[lid][1] == n["id"] for lid in o["links"])
        for name_, _, optional in GEN.NODE_TYPES[n["type"]].sockets:
            if not optional:
                assert any(i["name"] == name_ and i["link"] is not None for i in n["inputs"]), \
                    f"{n['type']} {n['id']}: required input {name_} is not connected"


@pytest.mark.parametrize("name", NAMES)
def test_api_file_is_the_ui_files_twin(name):
    wf, prompt = ui(name), api(name)
    nodes = {n["id"]: n for n in wf["nodes"] if n["type"] not in VIRTUAL}
    assert set(prompt) == {str(i) for i in nodes}
    links = {(link[3], nodes[link[3]]["inputs"][link[4]]["name"]): [str(link[1]), link[2]] for link in wf["links"]}
    for nid, n in nodes.items():
        entry = prompt[str(nid)]
        t = GEN.NODE_TYPES[n["type"]]
        assert entry["class_type"] == n["type"]
        linked = {name_: v for (dst, name_), v in links.items() if dst == nid}
        values = list(n["widgets_values"])
        widget_values = {}
        for w in t.widgets:
            widget_values[w] = values.pop(0)
            if w in t.control_after:
                values.pop(0)
        assert values == (["image"] if t.upload else [])
        expected = {**{w: v for w, v in widget_values.items() if w not in linked}, **linked}
        assert entry["inputs"] == expected, f"{name}: node {nid} ({n['type']})"
        assert entry.get("_meta", {}).get("title") == n.get("title")


def _node(wf, type_, title=None):
    found = [n for n in wf["nodes"] if n["type"] == type_ and (title is None or n.get("title") == title)]
    assert len(found) == 1, (type_, title, len(found))
    return found[0]


def _upstream_types(wf, node_id, input_name) -> set[str]:
    """Types of every node that feeds node_id's input (transitively)."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    inp = next(i for i in nodes[node_id]["inputs"] if i["name"] == input_name)
    todo, seen = [links[inp["link"]][1]], set()
    while todo:
        nid = todo.pop()
        if nid in seen:
            continue
        seen.add(nid)
        todo += [links[i["link"]][1] for i in nodes[nid]["inputs"] if i["link"] is not None]
    return {nodes[i]["type"] for i in seen}


def _source_of(wf, node_id, input_name):
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    inp = next(i for i in nodes[node_id]["inputs"] if i["name"] == input_name)
    return tuple(links[inp["link"]][1:3])


def test_sdxl_workflow_has_sdxl_defaults_and_says_it_is_untuned():
    wf = ui("stem_sdxl_tokenflow_edit")
    assert _node(wf, "STEMLoadVideoFrames")["widgets_values"][4:6] == [1024, False]
    assert _node(wf, "STEMTokenFlowEdit")["widgets_values"] == [7.5, 0.5, 0.8, 8, 1, "fixed", 0, "reference (batch middle)",
                                                               0, "auto", -1]
    assert not [n for n in wf["nodes"] if n["type"] == "FreeU"]
    note = next(n for n in wf["nodes"] if n["type"] == "Note")["widgets_values"][0]
    assert "UNTUNED" in note and "output blocks 1-5" in note
    edit = _node(wf, "STEMTokenFlowEdit")["id"]
    assert "STEMAttentionPatch" not in _upstream_types(wf, edit, "model")


def test_tokenflow_workflow_has_the_reference_defaults():
    wf = ui("stem_tokenflow_edit")
    p = {n["id"]: n for n in wf["nodes"]}
    assert _node(wf, "STEMInvert")["widgets_values"] == [50]
    assert _node(wf, "STEMTokenFlowEdit")["widgets_values"] == [7.5, 0.5, 0.8, 8, 1, "fixed", 0, "reference (batch middle)", 0, "auto", -1]
    assert _node(wf, "STEMAttentionPatch")["widgets_values"] == ["stem", 256, 5, 0.01, 1, "fixed", "whole clip", 8, 0]
    assert _node(wf, "FreeU")["widgets_values"] == [1.2, 1.4, 0.9, 0.2]
    assert _node(wf, "STEMLoadVideoFrames")["widgets_values"][4:6] == [512, False]
    assert _node(wf, "CLIPTextEncode", "Negative prompt")["widgets_values"] == [
        "ugly, blurry, low res, unrealistic, unaesthetic"]
    edit = _node(wf, "STEMTokenFlowEdit")["id"]
    invert = _node(wf, "STEMInvert")["id"]
    assert "STEMAttentionPatch" not in _upstream_types(wf, edit, "model")  # the edit runs unpatched...
    assert "FreeU" in _upstream_types(wf, edit, "model")  # ...with FreeU
    assert p[_source_of(wf, invert, "model")[0]]["type"] == "STEMAttentionPatch"
    assert "FreeU" not in _upstream_types(wf, invert, "model")
    assert _source_of(wf, edit, "negative")[0] == _node(wf, "CLIPTextEncode", "Negative prompt")["id"]


# TokenFlow Edit's widget values as a UI workflow saved before keyframes_per_pass was renamed from
# frames_per_pass (3 keyframes a pass): the frontend restores widget values by position.
OLD_TOKENFLOW_WIDGETS = [7.5, 0.5, 0.8, 8, 1, "fixed", 0, "reference (batch middle)", 3, "auto", -1]


def _widget_names(input_types: dict, control_after=("seed",)) -> list[str]:
    """The names of a node's widget values in a UI workflow, in order (a seed adds its control value)."""
    names = []
    for name, kind, opts, _ in _specs(input_types):
        if _is_widget(kind, opts):
            names += [name] + (["control_after_generate"] if name in control_after else [])
    return names


def test_an_old_ui_workflow_gives_keyframes_per_pass_its_frames_per_pass_value(pack):
    """Renaming TokenFlow Edit's frames_per_pass kept its place among the widgets, so a UI workflow
    saved with the old name gives its value to keyframes_per_pass."""
    values = dict(zip(_widget_names(pack.input_types["STEMTokenFlowEdit"]), OLD_TOKENFLOW_WIDGETS, strict=True))
    assert values["keyframes_per_pass"] == 3 and values["keyframe_positions"] == "reference (batch middle)"
    assert values["pnp_attention_blocks"] == "auto" and values["seed"] == 1


def test_fatezero_workflow_edits_one_inversion_two_ways_and_compares_them():
    wf = ui("stem_fatezero_edit")
    fz, tf = _node(wf, "STEMFateZeroEdit"), _node(wf, "STEMTokenFlowEdit")
    invert = _node(wf, "STEMInvert")["id"]
    assert _source_of(wf, fz["id"], "inversion")[0] == _source_of(wf, tf["id"], "inversion")[0] == invert
    assert "STEMAttentionPatch" not in _upstream_types(wf, fz["id"], "model")  # the source replays the record
    # FateZero's zero-shot style defaults; both editors and the inversion read the same two texts
    assert fz["widgets_values"][3:9] == ["refine", 0.8, 0.7, 7.5, "watercolor painting", 10.0]
    texts = {n["title"]: n["id"] for n in wf["nodes"] if n["type"] == "PrimitiveStringMultiline"}
    assert _source_of(wf, fz["id"], "source_prompt")[0] == texts["Source text"]
    assert _source_of(wf, fz["id"], "target_prompt")[0] == texts["Target text"]
    assert _source_of(wf, _source_of(wf, invert, "conditioning")[0], "text")[0] == texts["Source text"]
    metrics = _node(wf, "STEMVideoMetrics")["id"]
    decoders = {_source_of(wf, metrics, k)[0] for k in ("video_1", "video_2")}
    assert {_source_of(wf, d, "samples")[0] for d in decoders} == {fz["id"], tf["id"]}


def test_reconstruction_uses_each_inversions_model():
    wf = ui("stem_inversion_reconstruction")
    kinds = set()
    for rec in (n for n in wf["nodes"] if n["type"] == "STEMReconstruct"):
        inv = _source_of(wf, rec["id"], "inversion")[0]
        assert _source_of(wf, rec["id"], "model") == _source_of(wf, inv, "model")
        kinds.add("STEMAttentionPatch" in _upstream_types(wf, rec["id"], "model"))
    assert kinds == {True, False}  # one STEM inversion, one plain DDIM inversion


def test_ksampler_workflow_samples_with_the_patched_model():
    wf = ui("stem_attention_ksampler")
    ks = _node(wf, "KSampler")
    assert "STEMAttentionPatch" in _upstream_types(wf, ks["id"], "model")
    assert "VAEEncode" in _upstream_types(wf, ks["id"], "latent_image")
    assert 0 < ks["widgets_values"][-1] < 1 and ks["widgets_values"][1] == "fixed"
    # KSampler runs all its steps at any denoise (denoise picks the starting level from a
    # longer schedule), so the note's time must count every step, not steps x denoise
    note = _node(wf, "Note")["widgets_values"][0]
    steps, denoise = ks["widgets_values"][2], ks["widgets_values"][-1]
    assert f"{steps} UNet steps" in note and f"{int(steps * denoise)} denoising steps" not in note


@pytest.mark.parametrize("name", NAMES)
def test_each_workflow_explains_itself_and_saves_video(name):
    wf = ui(name)
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    sdxl = "sdxl" in name
    for must in ("models/checkpoints", "input/", "SDXL" if sdxl else "SD1.5", "Time"):
        assert must in text, f"{name}: the note does not mention {must!r}"
    assert any(n["type"] == "SaveVideo" for n in wf["nodes"])
    ckpt = "sd_xl_base_1.0.safetensors" if sdxl else "v1-5-pruned-emaonly.safetensors"
    assert _node(wf, "CheckpointLoaderSimple")["widgets_values"] == [ckpt]


@pytest.mark.parametrize("name", NAMES)
def test_each_ui_workflow_has_a_template_thumbnail(name):
    """ComfyUI's template browser shows ``<workflow>.jpg`` beside a pack's workflow."""
    thumb = WF / f"{name}.jpg"
    assert thumb.is_file(), f"{thumb.name} is missing (tests/comfyui/test_browser.py writes it)"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9", "not a complete JPEG"
    assert 2_000 < len(data) < 400_000
