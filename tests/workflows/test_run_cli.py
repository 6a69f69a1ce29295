"""The command-line runner's prompt building, batch files and argument handling, without ComfyUI
(workflows/run.py; tests/comfyui/test_cli.py runs it as a user would, in-process and on a server)."""
from __future__ import annotations

import json

import pytest

from unit_imports import ROOT, load_module

RUN = load_module("stem_run_cli", ROOT / "workflows" / "run.py")
API = ROOT / "workflows" / "api"


def api(name: str) -> dict:
    return json.loads((API / f"{name}.json").read_text())


def node(prompt: dict, cls: str, title_start: str = "") -> dict:
    found = [v for v in prompt.values() if v["class_type"] == cls
             and v.get("_meta", {}).get("title", "").startswith(title_start)]
    assert len(found) == 1, (cls, title_start, len(found))
    return found[0]["inputs"]


def full_job(**kw) -> "RUN.Job":
    values = dict(workflow="stem_tokenflow_edit", command="edit", clip="/clips/My Clip.mp4", source="a man",
                  target="a robot", negative="blurry", checkpoint="sd15.safetensors", frames=16, size=256, steps=20,
                  frames_per_pass=4, seed=7)
    values.update(kw)
    return RUN.Job(**values)


def test_edit_options_land_in_the_tokenflow_workflow():
    prompt = RUN.build_prompt(full_job(), "My Clip.mp4")
    assert node(prompt, "CheckpointLoaderSimple")["ckpt_name"] == "sd15.safetensors"
    loader = node(prompt, "STEMLoadVideoFrames")
    assert (loader["video"], loader["frame_load_cap"], loader["size"]) == ("My Clip.mp4", 16, 256)
    assert node(prompt, "CLIPTextEncode", "Source prompt")["text"] == "a man"
    assert node(prompt, "CLIPTextEncode", "Target prompt")["text"] == "a robot"
    assert node(prompt, "CLIPTextEncode", "Negative prompt")["text"] == "blurry"
    assert node(prompt, "STEMInvert")["steps"] == 20
    assert node(prompt, "STEMTokenFlowEdit")["steps"] == 0  # the edit follows the inversion's steps
    assert node(prompt, "STEMAttentionPatch")["frames_per_pass"] == 4
    assert node(prompt, "STEMTokenFlowEdit")["keyframes_per_pass"] == 4
    assert node(prompt, "STEMTokenFlowEdit")["seed"] == 7
    prefixes = sorted(v["inputs"]["filename_prefix"] for v in prompt.values() if v["class_type"] == "SaveVideo")
    assert prefixes == ["My-Clip_tokenflow_compare", "My-Clip_tokenflow_edit"]
    # nothing else changed: the same graph, the reference's settings
    original = api("stem_tokenflow_edit")
    assert prompt.keys() == original.keys()
    assert node(prompt, "STEMTokenFlowEdit")["batch_size"] == node(original, "STEMTokenFlowEdit")["batch_size"]
    assert node(prompt, "FreeU") == node(original, "FreeU")


def test_unset_options_keep_the_workflows_values():
    prompt = RUN.build_prompt(RUN.Job(workflow="stem_tokenflow_edit", command="edit", clip="c.mp4"), "c.mp4")
    original = api("stem_tokenflow_edit")
    for k, v in original.items():
        if v["class_type"] not in ("SaveVideo", "STEMLoadVideoFrames"):
            assert prompt[k] == v, k


def test_fatezero_and_compare_take_the_prompts_where_their_graphs_have_them():
    prompt = RUN.build_prompt(full_job(workflow="stem_fatezero_edit", command="fatezero"), "c.mp4")
    assert node(prompt, "PrimitiveStringMultiline", "Source text")["value"] == "a man"
    assert node(prompt, "PrimitiveStringMultiline", "Target text")["value"] == "a robot"
    fz = node(prompt, "STEMFateZeroEdit")
    assert fz["reweight_words"] == "" and fz["frames_per_pass"] == 4 and fz["seed"] == 7  # the example's words go
    assert node(prompt, "STEMTokenFlowEdit")["keyframes_per_pass"] == 4
    prompt = RUN.build_prompt(full_job(workflow="stem_inversion_reconstruction", command="compare", target=None,
                                       negative=None, seed=None), "c.mp4")
    assert node(prompt, "CLIPTextEncode", "Source prompt")["text"] == "a man"
    assert {v["inputs"]["steps"] for v in prompt.values() if v["class_type"] == "STEMInvert"} == {20}
    assert {v["inputs"]["frames_per_pass"] for v in prompt.values() if v["class_type"] == "STEMAttentionPatch"} == {4}
    with pytest.raises(RUN.UsageError, match="no target prompt"):
        RUN.build_prompt(full_job(workflow="stem_inversion_reconstruction", negative=None), "c.mp4")
    with pytest.raises(RUN.UsageError, match="--seed: workflow stem_inversion_reconstruction has no node"):
        RUN.build_prompt(full_job(workflow="stem_inversion_reconstruction", target=None, negative=None), "c.mp4")


def test_set_overrides_by_id_title_and_class_after_the_options():
    job = full_job(sets=["11.cfg=5", "FreeU.b1=1.1", "Target prompt (what it should show).text=a cat",
                         "STEMAttentionPatch.attention=inflated", "3.crop=true", "STEMInvert.steps=3"])
    prompt = RUN.build_prompt(job, "c.mp4")
    assert prompt["11"]["inputs"]["cfg"] == 5 and node(prompt, "FreeU")["b1"] == 1.1
    assert node(prompt, "CLIPTextEncode", "Target prompt")["text"] == "a cat"
    assert node(prompt, "STEMAttentionPatch")["attention"] == "inflated"
    assert node(prompt, "STEMLoadVideoFrames")["crop"] is True
    assert node(prompt, "STEMInvert")["steps"] == 3  # --set wins over --steps
    for bad, message in (("nonode.x=1", "no node 'nonode'"), ("FreeU.nope=1", "has no input 'nope'"),
                         ("11.model=1", "is a link"), ("cfg=5", "node.input=value"), ("11.cfg", "node.input=value")):
        with pytest.raises(RUN.UsageError, match=message):
            RUN.build_prompt(full_job(sets=[bad]), "c.mp4")


def test_save_frames_and_inversion_add_savers_wired_to_the_results():
    prompt = RUN.build_prompt(full_job(save_frames=True, save_inversion=True), "c.mp4")
    frames = [v for v in prompt.values() if v["class_type"] == "SaveImage"]
    assert len(frames) == 1  # the edit's frames, not the side-by-side's
    decode = prompt["13"]["inputs"]["images"]  # CreateVideo of Save Video (edit)
    assert frames[0]["inputs"] == {"images": decode, "filename_prefix": "My-Clip_tokenflow_edit_frames/frame"}
    saves = [v for v in prompt.values() if v["class_type"] == "STEMSaveInversion"]
    assert [s["inputs"] for s in saves] == [{"inversion": ["10", 0], "filename_prefix": "My-Clip_inversion"}]
    prompt = RUN.build_prompt(full_job(workflow="stem_inversion_reconstruction", command="compare", target=None,
                                       negative=None, seed=None, save_inversion=True), "c.mp4")
    saves = sorted(v["inputs"]["filename_prefix"] for v in prompt.values() if v["class_type"] == "STEMSaveInversion")
    assert saves == ["My-Clip_inversion_STEM", "My-Clip_inversion_inflated", "My-Clip_inversion_plain-DDIM"]


def test_workflow_names_and_files(tmp_path):
    assert RUN.workflow_path("stem_attention_ksampler").endswith("stem_attention_ksampler.json")
    with pytest.raises(RUN.UsageError, match="stem_tokenflow_edit"):
        RUN.workflow_path("nonexistent")
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(RUN.UsageError, match="not an API-format workflow"):
        RUN.load_workflow(str(ui))


def test_batch_files_csv_and_jsonl(tmp_path):
    defaults = RUN.Job(workflow="stem_tokenflow_edit", command="edit", size=128, sets=["FreeU.b1=1.0"])
    (tmp_path / "b.csv").write_text("clip,source,target,steps,set\n"
                                    "a.mp4,a man,a robot,,\n"
                                    "clips/b.mp4,a dog,a cat,10,STEMTokenFlowEdit.cfg=5;FreeU.b2=1\n"
                                    "a.mp4,a man,a knight,,\n")
    jobs = RUN.read_batch(str(tmp_path / "b.csv"), defaults)
    assert [(j.clip, j.target) for j in jobs] == [  # a clip's rows together, in their order
        (str(tmp_path / "a.mp4"), "a robot"), (str(tmp_path / "a.mp4"), "a knight"),
        (str(tmp_path / "clips" / "b.mp4"), "a cat")]
    assert [j.steps for j in jobs] == [None, None, 10] and {j.size for j in jobs} == {128}
    assert jobs[2].sets == ["FreeU.b1=1.0", "STEMTokenFlowEdit.cfg=5", "FreeU.b2=1"]
    assert [j.name for j in jobs] == ["a_a-robot", "a_a-knight", "b_a-cat"]  # results do not overwrite each other
    (tmp_path / "b.jsonl").write_text('{"clip": "a.mp4", "source": "x", "target": "y", "set": ["11.cfg=3"]}\n\n'
                                      '# a comment\n{"clip": "a.mp4", "command": "compare", "source": "x"}\n')
    jobs = RUN.read_batch(str(tmp_path / "b.jsonl"), defaults)
    assert [j.command for j in jobs] == ["edit", "compare"]
    assert jobs[1].workflow == "stem_inversion_reconstruction" and jobs[0].sets[-1] == "11.cfg=3"
    for text, message in (("clip,colour\na.mp4,red\n", "unknown column"), ("source\nx\n", "no clip"),
                          ("clip,steps\na.mp4,many\n", "whole number"), ("clip,command\na.mp4,paint\n", "command")):
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(RUN.UsageError, match=message):
            RUN.read_batch(str(tmp_path / "bad.csv"), defaults)


def test_help_shows_examples_and_bad_command_lines_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        RUN.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "run.py edit tennis.mp4 --source" in out and "--server http://127.0.0.1:8188" in out
    with pytest.raises(SystemExit) as e:
        RUN.main(["edit", "x.mp4", "--target", "y"])  # --source is required
    assert e.value.code == 2
    assert RUN.main(["edit", str(tmp_path / "missing.mp4"), "--source", "a", "--target", "b"]) == RUN.EXIT_USAGE
    assert "clip not found" in capsys.readouterr().err
    (tmp_path / "c.mp4").write_bytes(b"")
    assert RUN.main(["edit", str(tmp_path / "c.mp4"), "--source", "a"]) == RUN.EXIT_USAGE
    assert "--target is required" in capsys.readouterr().err


def test_output_files_and_free_paths(tmp_path):
    history = {"outputs": {"14": {"images": [{"filename": "x_00001_.mp4", "subfolder": "", "type": "output"}],
                                  "animated": [True]},
                           "save_inversion_10": {"text": ["inv/c_00001.safetensors [output]"]},
                           "24": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]}}}
    assert RUN.output_files(history) == [("14", "x_00001_.mp4", "output"),
                                         ("save_inversion_10", "inv/c_00001.safetensors", "output"),
                                         ("24", "p.png", "temp")]
    (tmp_path / "x_00001_.mp4").write_bytes(b"1")
    (tmp_path / "x_00002_.mp4").write_bytes(b"2")
    assert RUN.free_path(str(tmp_path / "x_00001_.mp4")) == str(tmp_path / "x_00003_.mp4")
    assert RUN.free_path(str(tmp_path / "new.mp4")) == str(tmp_path / "new.mp4")
