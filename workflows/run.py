#!/usr/bin/env python3
"""Run the pack's bundled workflows from the command line.

``python workflows/run.py edit CLIP --source "..." --target "..."`` runs the TokenFlow edit
workflow (``workflows/api/stem_tokenflow_edit.json``) on CLIP with ComfyUI's own executor in this
process, or queues it on a running ComfyUI with ``--server URL``; ``fatezero`` and ``compare`` run
the FateZero and the inversion-comparison workflows, ``workflow`` runs any API-format workflow
with ``--set node.input=value`` overrides, and ``batch`` runs a CSV or JSON-lines file of edits in
one process. ``python workflows/run.py --help`` has examples.

Only the standard library is imported here at module level: the prompt is built (and tested)
without ComfyUI; ComfyUI, torch and aiohttp are imported when a run starts.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field, replace

HERE = os.path.dirname(os.path.abspath(__file__))  # not resolved: custom_nodes/<pack> may be a link
PACK = os.path.dirname(HERE)
API_DIR = os.path.join(HERE, "api")

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 1, 2, 130

COMMANDS = {  # command: (bundled API workflow, what it does)
    "edit": ("stem_tokenflow_edit", "STEM inversion, then a TokenFlow edit; saves the edit and source | edit"),
    "fatezero": ("stem_fatezero_edit", "STEM inversion, then TokenFlow and FateZero edits side by side"),
    "compare": ("stem_inversion_reconstruction",
                "the paper's comparison: per-frame DDIM, inflated and STEM inversion, each reconstructed"),
}
SAVERS = ("SaveVideo", "SaveImage", "SaveAnimatedWEBP", "SaveAnimatedPNG", "STEMVideoMetrics", "STEMSaveInversion")

EXAMPLES = """\
examples:
  # edit a clip (TokenFlow, the reference's settings: 512 px, 50 steps); writes the edit and source | edit
  python workflows/run.py edit tennis.mp4 --source "a man is playing tennis" \\
      --target "Spider-Man is playing tennis" --checkpoint v1-5-pruned-emaonly.safetensors

  # a quick look: 16 frames at 256 px, 20 steps, frames and the inversion saved too
  python workflows/run.py edit tennis.mp4 --source "a man is playing tennis" --target "a robot is playing tennis" \\
      --frames 16 --size 256 --steps 20 --save-frames --save-inversion --out edits/

  # FateZero beside TokenFlow; the paper's inversion comparison
  python workflows/run.py fatezero tennis.mp4 --source "a man is playing tennis" --target "a watercolor painting of a man playing tennis"
  python workflows/run.py compare tennis.mp4 --source "a man is playing tennis" --frames 16

  # any input of any node: by node id, title or class (all nodes of that class)
  python workflows/run.py edit tennis.mp4 --source ... --target ... --set STEMTokenFlowEdit.cfg=5 --set FreeU.b1=1.1
  python workflows/run.py workflow stem_attention_ksampler --set 3.video=tennis.mp4 --set KSampler.denoise=0.5

  # many edits in one process: the checkpoint loads once, a clip is inverted once for all its prompts
  python workflows/run.py batch edits.csv --size 384        # columns: clip,source,target[,command,steps,...]

  # on a running ComfyUI (its progress over the websocket; the clip is uploaded to its input folder)
  python workflows/run.py edit tennis.mp4 --source ... --target ... --server http://127.0.0.1:8188 --out edits/

exit status: 0 done, 1 a node failed, 2 bad command line or input, 130 cancelled (Ctrl-C).
Ctrl-C cancels within seconds and writes nothing; press it twice to quit at once.
"""


class UsageError(Exception):
    """A bad command line or input, found before (or by ComfyUI's validation before) any work."""


# ---------------------------------------------------------------------------------------------
# What to run: a job, and the API prompt it becomes
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One run of one workflow. ``None`` leaves the workflow's own value."""

    workflow: str  # a bundled name (workflows/api/NAME.json) or a path
    clip: str | None = None
    command: str = "workflow"
    source: str | None = None
    target: str | None = None
    negative: str | None = None
    checkpoint: str | None = None
    frames: int | None = None
    size: int | None = None
    steps: int | None = None
    frames_per_pass: int | None = None
    seed: int | None = None
    sets: list[str] = field(default_factory=list)
    save_inversion: bool = False
    save_frames: bool = False
    name: str = ""  # prefix of the saved results (the clip's name; in a batch, the clip's and the target's)


def workflow_path(workflow: str) -> str:
    """A bundled workflow's API file by name, or the path given."""
    if os.path.isfile(workflow):
        return workflow
    bundled = os.path.join(API_DIR, workflow if workflow.endswith(".json") else workflow + ".json")
    if os.path.isfile(bundled):
        return bundled
    names = sorted(n[:-5] for n in os.listdir(API_DIR) if n.endswith(".json"))
    raise UsageError(f"workflow '{workflow}' is neither a file nor a bundled workflow ({', '.join(names)})")


def load_workflow(workflow: str) -> dict:
    path = workflow_path(workflow)
    with open(path, encoding="utf-8") as f:
        prompt = json.load(f)
    if not isinstance(prompt, dict) or not all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        raise UsageError(f"{path} is not an API-format workflow (export it with 'Export (API)' in ComfyUI)")
    return prompt


def title(prompt: dict, node_id: str) -> str:
    node = prompt.get(node_id, {})
    return node.get("_meta", {}).get("title") or node.get("class_type", "?")


def _of_class(prompt: dict, *classes: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] in classes]


def _titled(prompt: dict, cls: str, start: str) -> list[str]:
    return [k for k in _of_class(prompt, cls) if title(prompt, k).lower().startswith(start.lower())]


def _set_all(prompt: dict, ids: list[str], name: str, value) -> int:
    n = 0
    for k in ids:
        if name in prompt[k]["inputs"] and not isinstance(prompt[k]["inputs"][name], list):
            prompt[k]["inputs"][name] = value
            n += 1
    return n


def _text_nodes(prompt: dict, role: str) -> list[tuple[str, str]]:
    """Where a workflow takes its source/target/negative text: (node id, input name)."""
    found = [(k, "value") for k in _titled(prompt, "PrimitiveStringMultiline", f"{role} text")]
    found += [(k, "text") for k in _titled(prompt, "CLIPTextEncode", f"{role} prompt")
              if not isinstance(prompt[k]["inputs"].get("text"), list)]
    return found


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].strip("-") or "clip"


def parse_value(text: str):
    """A --set value: JSON where it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_set(prompt: dict, assignment: str) -> None:
    """``node.input=value``: node is an id, a title (whole, any case) or a class (every node of it)."""
    target, eq, value = assignment.partition("=")
    node, dot, name = target.rpartition(".")
    if not eq or not dot or not node or not name:
        raise UsageError(f"--set {assignment!r}: write node.input=value, e.g. STEMTokenFlowEdit.cfg=5 or 11.cfg=5")
    ids = ([node] if node in prompt else
           [k for k in prompt if title(prompt, k).lower() == node.lower()] or _of_class(prompt, node))
    if not ids:
        nodes = ", ".join(f"{k} ({title(prompt, k)})" for k in prompt)
        raise UsageError(f"--set {assignment!r}: no node '{node}' in the workflow; its nodes: {nodes}")
    for k in ids:
        inputs = prompt[k]["inputs"]
        if name not in inputs:
            raise UsageError(f"--set {assignment!r}: node {k} ({title(prompt, k)}) has no input '{name}'; "
                             f"its inputs: {', '.join(inputs)}")
        if isinstance(inputs[name], list):
            raise UsageError(f"--set {assignment!r}: input '{name}' of node {k} is a link, not a value")
        inputs[name] = parse_value(value)


def build_prompt(job: Job, clip_name: str | None) -> dict:
    """The API prompt of ``job``, with the clip named ``clip_name`` (as ComfyUI will resolve it):
    the named options first, then the ``--set`` overrides, then the nodes that save frames and
    the inversion where asked. Output files are named after ``job.name``."""
    prompt = load_workflow(job.workflow)
    loaders = _of_class(prompt, "STEMLoadVideoFrames")
    if clip_name is not None:
        if not loaders:
            raise UsageError(f"workflow {job.workflow} has no Load Video Frames node to take the clip")
        _set_all(prompt, loaders, "video", clip_name)
    for role, text in (("source", job.source), ("target", job.target), ("negative", job.negative)):
        if text is None:
            continue
        where = _text_nodes(prompt, role)
        if not where:
            raise UsageError(f"workflow {job.workflow} has no {role} prompt (a node titled '{role.title()} prompt' "
                             f"or '{role.title()} text'); use --set")
        for k, name in where:
            prompt[k]["inputs"][name] = text
    options = [  # (value, where it goes, its option's name)
        (job.checkpoint, [("CheckpointLoaderSimple", "ckpt_name")]),
        (job.frames, [("STEMLoadVideoFrames", "frame_load_cap")]),
        (job.size, [("STEMLoadVideoFrames", "size")]),
        (job.steps, [("STEMInvert", "steps"), ("KSampler", "steps")]),
        (job.frames_per_pass, [("STEMAttentionPatch", "frames_per_pass"), ("STEMTokenFlowEdit", "keyframes_per_pass"),
                               ("STEMFateZeroEdit", "frames_per_pass")]),
        (job.seed, [("STEMTokenFlowEdit", "seed"), ("STEMFateZeroEdit", "seed"), ("KSampler", "seed")]),
    ]
    for (value, targets), option in zip(options, ("--checkpoint", "--frames", "--size", "--steps",
                                                   "--frames-per-pass", "--seed")):
        if value is not None and not sum(_set_all(prompt, _of_class(prompt, cls), name, value) for cls, name in targets):
            raise UsageError(f"{option}: workflow {job.workflow} has no node it applies to "
                             f"({', '.join(f'{c}.{n}' for c, n in targets)}); leave it out or use --set")
    if job.command == "fatezero" and job.target is not None:
        # the bundled graph reweights its own example's style words, which a new target lacks
        _set_all(prompt, _of_class(prompt, "STEMFateZeroEdit"), "reweight_words", "")
    clip_name_stem = slug(os.path.splitext(os.path.basename(job.clip.rstrip("/\\")))[0]) if job.clip else "stem"
    name = job.name or clip_name_stem
    for k in _of_class(prompt, *SAVERS):
        prefix = prompt[k]["inputs"].get("filename_prefix")
        if isinstance(prefix, str):
            prompt[k]["inputs"]["filename_prefix"] = f"{name}_{prefix.rstrip('/').rsplit('/', 1)[-1]}"
    for assignment in job.sets:
        apply_set(prompt, assignment)
    if job.save_frames:
        for k in _of_class(prompt, "SaveVideo"):
            if "|" in title(prompt, k):
                continue  # a side-by-side comparison, not a result
            video = prompt[k]["inputs"].get("video")
            maker = prompt.get(video[0]) if isinstance(video, list) else None
            images = maker and maker["class_type"] == "CreateVideo" and maker["inputs"].get("images")
            if isinstance(images, list):
                tail = prompt[k]["inputs"]["filename_prefix"]
                prompt[f"frames_{k}"] = {"class_type": "SaveImage",
                                         "_meta": {"title": f"Save frames ({node_label(prompt, k)} frames)"},
                                         "inputs": {"images": images, "filename_prefix": f"{tail}_frames/frame"}}
    if job.save_inversion:
        inverts = _of_class(prompt, "STEMInvert")
        if not inverts:
            raise UsageError(f"--save-inversion: workflow {job.workflow} has no STEM Invert node")
        for k in inverts:
            suffix = "" if len(inverts) == 1 else "_" + slug(title(prompt, k).partition("(")[2] or k)
            prompt[f"save_inversion_{k}"] = {"class_type": "STEMSaveInversion",
                                             "_meta": {"title": "Save inversion (inversion" + (
                                                 f" {node_label(prompt, k)})" if len(inverts) > 1 else ")")},
                                             "inputs": {"inversion": [k, 0],  # one per clip, not per target
                                                        "filename_prefix": f"{clip_name_stem}_inversion{suffix}"}}
    return prompt


# ---------------------------------------------------------------------------------------------
# Batch files
# ---------------------------------------------------------------------------------------------

ROW_KEYS = {"clip", "source", "target", "negative", "command", "workflow", "checkpoint", "frames", "size", "steps",
            "frames_per_pass", "seed", "set", "name"}
INT_KEYS = {"frames", "size", "steps", "frames_per_pass", "seed"}


def read_batch(path: str, defaults: Job) -> list[Job]:
    """Jobs from a CSV (a header row naming the columns) or JSON-lines file. Each row needs
    ``clip``; ``command`` is edit (default), fatezero or compare; other keys override the command
    line's options for that row; ``set`` is a list (JSON) or ``;``-separated (CSV). Relative clip
    paths are taken from the batch file's folder. Rows keep their order, grouped by clip."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"batch file {path}: {e.strerror or e}") from None
    rows: list[tuple[int, dict]] = []
    if path.lower().endswith((".jsonl", ".ndjson", ".json")):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{path}:{n}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise UsageError(f"{path}:{n}: not a JSON object")
                rows.append((n, row))
    else:
        reader = csv.DictReader(text.splitlines())
        for n, row in enumerate(reader, 2):
            rows.append((n, {k.strip(): (v or "").strip() for k, v in row.items() if k and (v or "").strip()}))
    if not rows:
        raise UsageError(f"batch file {path} has no rows")
    base = os.path.dirname(os.path.abspath(path))
    jobs = []
    for n, row in rows:
        unknown = set(row) - ROW_KEYS
        if unknown:
            raise UsageError(f"{path}:{n}: unknown column(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(ROW_KEYS))}")
        if not row.get("clip"):
            raise UsageError(f"{path}:{n}: no clip")
        command = row.get("command", "edit")
        if command not in COMMANDS:
            raise UsageError(f"{path}:{n}: command must be one of {', '.join(COMMANDS)}, not {command!r}")
        values = {}
        for key, value in row.items():
            if key in INT_KEYS:
                try:
                    values[key] = int(value)
                except (TypeError, ValueError):
                    raise UsageError(f"{path}:{n}: {key} must be a whole number, not {value!r}") from None
            elif key not in ("clip", "set", "command"):
                values[key] = str(value)
        sets = row.get("set", [])
        sets = [s for s in (sets.split(";") if isinstance(sets, str) else sets) if str(s).strip()]
        clip = os.path.join(base, os.path.expanduser(str(row["clip"])))
        job = replace(defaults, command=command, workflow=values.pop("workflow", COMMANDS[command][0]), clip=clip,
                      sets=list(defaults.sets) + [str(s).strip() for s in sets], **values)
        if job.target is not None and not job.name:
            job.name = f"{slug(os.path.splitext(os.path.basename(clip))[0])}_{slug(job.target, 24)}"
        jobs.append(job)
    first = {}
    for i, job in enumerate(jobs):
        first.setdefault(os.path.realpath(job.clip), i)
    return sorted(jobs, key=lambda j: first[os.path.realpath(j.clip)])  # stable: a clip's rows stay in order


# ---------------------------------------------------------------------------------------------
# The terminal: progress bar, plan line, results
# ---------------------------------------------------------------------------------------------


class Display:
    """Prints a run's events: the node that runs, a progress bar per UNet pass (ComfyUI's
    progress, with the node's "step s/S, pass p/P"), the memory plan line, cached nodes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.prompt: dict = {}
        self.texts: dict[str, str] = {}
        self.open_bar = False
        self.last_bar = ""

    def start(self, prompt: dict) -> None:
        self.prompt, self.texts = prompt, {}

    def _end_bar(self) -> None:
        if self.open_bar:
            self.stream.write("\n")
            self.open_bar = False

    def line(self, text: str) -> None:
        self._end_bar()
        self.stream.write(text + "\n")
        self.stream.flush()

    def executing(self, node: str) -> None:
        self.line(f"> {title(self.prompt, node)} (node {node})")

    def cached(self, nodes: list[str]) -> None:
        if nodes:
            self.line("  reused from ComfyUI's cache: " + ", ".join(title(self.prompt, n) for n in nodes))

    def text(self, node: str, text: str) -> None:
        self.texts[str(node)] = text
        if not text.startswith("step "):
            self.line(f"  plan: {text}")

    def progress(self, node: str, value: float, total: float) -> None:
        node = str(node)
        width = 30
        filled = int(width * value / total) if total else 0
        label = self.texts.get(node) if self.texts.get(node, "").startswith("step ") else None
        if label is None and self.prompt.get(node, {}).get("class_type") in ("STEMInvert", "STEMReconstruct",
                                                                              "KSampler"):
            label = f"step {int(value)}/{int(total)}"
        bar = f"  [{'#' * filled}{'.' * (width - filled)}] {int(value)}/{int(total)}  {label or ''}".rstrip()
        if bar == self.last_bar:
            return  # the same pass again, with its preview
        self.last_bar = bar
        if self.tty:
            self.stream.write("\r" + bar.ljust(79))
            self.open_bar = True
            if value >= total:
                self._end_bar()
        else:
            self.stream.write(bar + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Runs and their results
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # "done", "failed", "invalid", "cancelled"
    message: str = ""
    files: list[tuple[str, str]] = field(default_factory=list)  # (label, path)
    cached: list[str] = field(default_factory=list)
    seconds: float = 0.0


def node_label(prompt: dict, node_id: str) -> str:
    t = title(prompt, node_id)
    inner = t[t.find("(") + 1:t.rfind(")")] if "(" in t and t.endswith(")") else t
    return inner.strip() or t


def output_files(history: dict) -> list[tuple[str, str, str]]:
    """(node id, subfolder/filename, folder type) of every file a prompt's output nodes report."""
    found = []
    for node_id, out in (history.get("outputs") or {}).items():
        for value in out.values():
            for item in value if isinstance(value, (list, tuple)) else []:
                if isinstance(item, dict) and item.get("filename"):
                    rel = "/".join(p for p in (item.get("subfolder") or "", item["filename"]) if p)
                    found.append((str(node_id), rel, item.get("type", "output")))
                elif isinstance(item, str) and item.endswith(" [output]"):
                    found.append((str(node_id), item[:-len(" [output]")], "output"))
    return found


def format_validation(prompt: dict, error: dict | None, node_errors: dict | None) -> str:
    lines = []
    for node_id, info in (node_errors or {}).items():
        for e in info.get("errors", []):
            detail = e.get("details") or ""
            lines.append(f"{title(prompt, str(node_id))} (node {node_id}, {info.get('class_type', '?')}): "
                         f"{e.get('message', '')}{': ' + detail if detail and detail not in e.get('message', '') else ''}")
    if not lines and error:
        lines.append(f"{error.get('message', '')}: {error.get('details', '')}".strip(": "))
    return "\n".join(lines) or "the prompt is not valid"


def format_failure(prompt: dict, data: dict) -> str:
    node = str(data.get("node_id", "?"))
    return (f"{title(prompt, node)} (node {node}, {data.get('node_type', '?')}) failed: "
            f"{data.get('exception_message', '').strip()}")


def free_path(path: str) -> str:
    """``path``, or where a file is there already the next free ComfyUI-style number."""
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    m = re.match(r"(.*_)(\d{5})(_?)$", stem)
    head, n, tail = (m.group(1), int(m.group(2)), m.group(3)) if m else (stem + "_", 1, "")
    while True:
        n += 1
        candidate = f"{head}{n:05d}{tail}{ext}"
        if not os.path.exists(candidate):
            return candidate


# ---------------------------------------------------------------------------------------------
# ComfyUI in this process
# ---------------------------------------------------------------------------------------------


def find_comfyui(explicit: str | None) -> str:
    """The ComfyUI checkout: --comfyui, $COMFYUI_PATH, the folder this pack is installed in
    (ComfyUI/custom_nodes/<pack>), ~/ComfyUI."""
    candidates = [explicit, os.environ.get("COMFYUI_PATH")]
    if os.path.basename(os.path.dirname(PACK)) == "custom_nodes":
        candidates.append(os.path.dirname(os.path.dirname(PACK)))
    candidates.append("~/ComfyUI")
    for c in candidates:
        if c:
            path = os.path.abspath(os.path.expanduser(c))
            if os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
                return path
            if c in (explicit, os.environ.get("COMFYUI_PATH")):
                raise UsageError(f"no ComfyUI checkout at {path} (it has no comfy/model_patcher.py); "
                                 "pass --comfyui PATH or set COMFYUI_PATH")
    raise UsageError("no ComfyUI found: run this from ComfyUI/custom_nodes/<this pack>, pass --comfyui PATH, "
                     "or use --server URL")


def comfyui_python(comfy: str) -> str | None:
    env = os.environ.get("COMFYUI_PYTHON")
    for c in ([env] if env else []) + [os.path.join(comfy, "venv", "bin", "python"),
                                       os.path.join(comfy, ".venv", "bin", "python"),
                                       os.path.join(os.path.dirname(comfy), "venv", "bin", "python"),
                                       os.path.join(comfy, "venv", "Scripts", "python.exe")]:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def reexec_in_comfyui_python(comfy: str) -> None:
    """Run this script again in ComfyUI's interpreter when this one cannot import torch."""
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    python = comfyui_python(comfy)
    if python is None or os.environ.get("STEM_RUN_REEXEC") or os.path.realpath(python) == os.path.realpath(sys.executable):
        raise UsageError(f"{sys.executable} cannot import torch; run this with ComfyUI's python "
                         "(or set COMFYUI_PYTHON)")
    os.environ["STEM_RUN_REEXEC"] = "1"
    os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])


class LocalComfy:
    """ComfyUI's executor in this process, with this object as its server: PromptExecutor,
    ProgressBar's hook and the nodes' progress text report here, and go to the Display.
    One executor for all runs (ComfyUI's classic cache, as the server has): a later prompt
    reuses every node whose inputs did not change, the checkpoint and a clip's inversion."""

    client_id = "stem-run"

    def __init__(self, comfy_path: str, comfy_args: str, display: Display, verbose: bool):
        self.display = display
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.cancelled = False
        self.staging: str | None = None
        level = logging.INFO if verbose else logging.WARNING
        # ComfyUI's notes on optional nodes it could not import while it starts: -v shows them
        logging.basicConfig(level=level if verbose else logging.ERROR, format="%(message)s", stream=sys.stderr,
                            force=True)
        if comfy_path in sys.path:
            sys.path.remove(comfy_path)
        sys.path.insert(0, comfy_path)
        import comfy.options  # ComfyUI parses --comfyui-args as main.py parses its command line
        comfy.options.enable_args_parsing()
        argv, sys.argv = sys.argv, ["main.py", *shlex.split(comfy_args or "")]
        try:
            import comfy.cli_args as cli
        except SystemExit:
            raise UsageError(f"--comfyui-args {comfy_args!r}: ComfyUI did not accept these (see above)") from None
        finally:
            sys.argv = argv
        import torch
        accelerated = torch.cuda.is_available() or getattr(getattr(torch.backends, "mps", None), "is_available",
                                                           lambda: False)()
        if not accelerated and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            cli.args.cpu = True
        import comfy.model_management  # noqa: F401  after the arguments
        import utils.extra_config  # ComfyUI's utils package, before nodes (see main.py)
        import folder_paths
        yaml = os.path.join(comfy_path, "extra_model_paths.yaml")
        if os.path.isfile(yaml):
            utils.extra_config.load_extra_path_config(yaml)
        for paths in cli.args.extra_model_paths_config or []:  # nargs="+", action="append"
            for path in paths:
                utils.extra_config.load_extra_path_config(path)
        for setter, value in ((folder_paths.set_output_directory, cli.args.output_directory),
                              (folder_paths.set_input_directory, cli.args.input_directory),
                              (folder_paths.set_user_directory, cli.args.user_directory)):
            if value:
                setter(os.path.abspath(value))
        import server
        server.PromptServer.instance = self  # what nodes (and this pack's progress text) report to
        from aiohttp import web
        self.routes = web.RouteTableDef()  # for packs that add routes when they load
        import asyncio

        import execution
        import nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        if "STEMTokenFlowEdit" not in nodes.NODE_CLASS_MAPPINGS:  # this pack is not in custom_nodes
            if not asyncio.run(nodes.load_custom_node(PACK, ignore=set(), module_parent="custom_nodes")):
                raise RuntimeError(f"ComfyUI could not load {PACK} as a custom node pack (see the log above)")
        logging.getLogger().setLevel(level)
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        self.executor = execution.PromptExecutor(self, cache_type=execution.CacheType.CLASSIC)
        self.folder_paths = folder_paths

    # what the executor, the progress registry and nodes use of server.PromptServer
    def send_sync(self, event, data, sid=None):
        if not isinstance(event, str):
            return  # previews
        if event == "executing" and data.get("node") is not None:
            self.display.executing(str(data["node"]))
        elif event == "execution_cached":
            self.display.cached([str(n) for n in data.get("nodes", [])])

    def send_progress_text(self, text, node_id, sid=None):
        self.display.text(str(node_id), text.decode() if isinstance(text, bytes) else str(text))

    def queue_updated(self):
        pass

    def _progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        import comfy.model_management
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        node_id = node_id or (context.node_id if context else None) or self.last_node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        get_progress_state().update_progress(node_id, value, total, preview_image)
        if node_id is not None:
            self.display.progress(str(node_id), value, total)

    def cancel(self) -> None:
        import comfy.model_management
        self.cancelled = True
        comfy.model_management.interrupt_current_processing(True)

    def discard(self) -> None:
        """Before quitting at once: remove the running prompt's staging folder."""
        if self.staging:
            shutil.rmtree(self.staging, ignore_errors=True)

    def available_checkpoints(self) -> list[str]:
        return self.folder_paths.get_filename_list("checkpoints")

    def run(self, prompt: dict, clip: str | None, out_dir: str) -> Outcome:
        """Validates and runs ``prompt``; its files are written to a staging folder in
        ``out_dir`` and moved into ``out_dir`` only when the whole prompt succeeded."""
        import asyncio

        import execution
        fp = self.folder_paths
        if clip is not None:  # the clip's folder is ComfyUI's input folder for this run
            fp.set_input_directory(os.path.dirname(os.path.abspath(clip.rstrip("/\\"))))
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid or node_errors:
            return Outcome("invalid", format_validation(prompt, error, node_errors))
        os.makedirs(out_dir, exist_ok=True)
        self.staging = staging = os.path.join(out_dir, f".stem-run-{prompt_id[:8]}")
        fp.set_output_directory(staging)
        fp.set_temp_directory(os.path.join(staging, ".temp"))
        self.last_prompt_id = prompt_id
        self.display.start(prompt)
        t0 = time.perf_counter()
        try:
            if self.cancelled:
                return Outcome("cancelled", "cancelled before the run started")
            self.executor.execute(prompt, prompt_id, {"client_id": self.client_id}, outputs)
            seconds = time.perf_counter() - t0
            cached = next((d["nodes"] for e, d in self.executor.status_messages if e == "execution_cached"), [])
            failure = next(((e, d) for e, d in self.executor.status_messages
                            if e in ("execution_error", "execution_interrupted")), None)
            if self.cancelled or (failure and failure[0] == "execution_interrupted"):
                return Outcome("cancelled", "cancelled (Ctrl-C); nothing was written", seconds=seconds)
            if failure or not self.executor.success:
                return Outcome("failed", format_failure(prompt, failure[1] if failure else {}), seconds=seconds)
            labels = {rel: node_label(prompt, node_id)
                      for node_id, rel, kind in output_files(self.executor.history_result) if kind == "output"}
            files = []  # everything written (a node may write more than it reports, e.g. a CSV)
            for folder, dirs, names in os.walk(staging):
                dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) != os.path.join(staging, ".temp"))
                for filename in sorted(names):
                    rel = os.path.relpath(os.path.join(folder, filename), staging).replace(os.sep, "/")
                    dst = free_path(os.path.join(out_dir, *rel.split("/")))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    os.replace(os.path.join(folder, filename), dst)
                    files.append((labels.get(rel, "also written"), dst))
            return Outcome("done", files=files, cached=[str(n) for n in cached], seconds=seconds)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            self.staging = None


# ---------------------------------------------------------------------------------------------
# A running ComfyUI server
# ---------------------------------------------------------------------------------------------


class RemoteComfy:
    """Queues prompts on a ComfyUI server (POST /prompt), follows them over its websocket and
    downloads what they saved (GET /view) into --out, each file complete or not at all."""

    def __init__(self, url: str, display: Display):
        try:
            import aiohttp  # noqa: F401  (ComfyUI's own requirement)
        except ImportError:
            raise UsageError("--server needs the aiohttp package (pip install aiohttp, or run this with ComfyUI's "
                             "python)") from None
        self.url = url.rstrip("/")
        self.display = display
        self.client_id = f"stem-run-{uuid.uuid4().hex[:8]}"
        self.cancelled = False
        self.uploaded: dict[str, str] = {}
        self.part: str | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def discard(self) -> None:
        """Before quitting at once: remove a download in progress."""
        if self.part:
            with contextlib.suppress(OSError):
                os.remove(self.part)

    def available_checkpoints(self) -> list[str] | None:
        return None  # the server's validation says it

    def run(self, prompt: dict, clip: str | None, out_dir: str | None) -> Outcome:
        import asyncio
        try:
            return asyncio.run(self._run(prompt, clip, out_dir))
        except OSError as e:  # aiohttp.ClientError is an OSError for connection failures
            return Outcome("invalid", f"cannot reach the ComfyUI server at {self.url}: {e}")

    async def _upload(self, session, clip: str) -> str:
        import aiohttp
        if clip in self.uploaded:
            return self.uploaded[clip]
        if os.path.isdir(clip):
            raise UsageError(f"{clip}: with --server the clip must be a video file (a folder of images cannot "
                             "be uploaded); put the folder in the server's input folder and use --set")
        form = aiohttp.FormData()
        form.add_field("type", "input")
        form.add_field("subfolder", "stem_cli")
        form.add_field("overwrite", "true")
        with open(clip, "rb") as f:
            form.add_field("image", f, filename=os.path.basename(clip))
            async with session.post(self.url + "/upload/image", data=form) as r:
                if r.status != 200:
                    raise UsageError(f"the server refused the upload of {clip}: {r.status} {await r.text()}")
                info = await r.json()
        name = "/".join(p for p in (info.get("subfolder"), info["name"]) if p)
        self.uploaded[clip] = name
        return name

    async def _run(self, prompt: dict, clip: str | None, out_dir: str | None) -> Outcome:
        import aiohttp
        async with aiohttp.ClientSession() as session:
            if clip is not None:
                name = await self._upload(session, clip)
                for k in _of_class(prompt, "STEMLoadVideoFrames"):
                    prompt[k]["inputs"]["video"] = name
            ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
            async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                async with session.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}) as r:
                    answer = await r.json(content_type=None)
                if r.status != 200 or "prompt_id" not in answer:
                    return Outcome("invalid", format_validation(prompt, answer.get("error"), answer.get("node_errors")))
                prompt_id = answer["prompt_id"]
                self.display.start(prompt)
                t0 = time.perf_counter()
                outcome = await self._follow(session, ws, prompt, prompt_id)
                outcome.seconds = time.perf_counter() - t0
            if outcome.status == "done":
                async with session.get(f"{self.url}/history/{prompt_id}") as r:
                    history = (await r.json()).get(prompt_id, {})
                for node_id, rel, kind in output_files(history):
                    if kind != "output":
                        continue
                    path = f"{kind}/{rel} (on the server)"
                    if out_dir:
                        path = await self._download(session, rel, out_dir)
                    outcome.files.append((node_label(prompt, node_id), path))
            return outcome

    async def _follow(self, session, ws, prompt: dict, prompt_id: str) -> Outcome:
        import asyncio
        import struct

        import aiohttp
        cached: list[str] = []
        interrupt_sent = False
        while True:
            if self.cancelled and not interrupt_sent:
                interrupt_sent = True
                await session.post(self.url + "/queue", json={"delete": [prompt_id]})
                await session.post(self.url + "/interrupt", json={"prompt_id": prompt_id})
            try:
                msg = await ws.receive(timeout=0.5)
            except asyncio.TimeoutError:
                continue
            if msg.type == aiohttp.WSMsgType.BINARY:
                kind = struct.unpack(">I", msg.data[:4])[0]
                if kind == 3:  # BinaryEventTypes.TEXT: node id length, node id, text
                    n = struct.unpack(">I", msg.data[4:8])[0]
                    self.display.text(msg.data[8:8 + n].decode(), msg.data[8 + n:].decode(errors="replace"))
                continue
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return Outcome("failed", "the server closed the connection")
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "executing" and data.get("prompt_id") == prompt_id:
                if data.get("node") is None:
                    if self.cancelled:
                        return Outcome("cancelled", "cancelled (Ctrl-C); nothing was downloaded")
                    return Outcome("done", cached=cached)
                self.display.executing(str(data["node"]))
            elif kind == "execution_cached":
                cached = [str(n) for n in data.get("nodes", [])]
                self.display.cached(cached)
            elif kind == "progress" and data.get("node") is not None:
                self.display.progress(str(data["node"]), data.get("value", 0), data.get("max", 0))
            elif kind == "execution_interrupted":
                return Outcome("cancelled", "cancelled (Ctrl-C); nothing was downloaded")
            elif kind == "execution_error":
                return Outcome("failed", format_failure(prompt, data))

    async def _download(self, session, rel: str, out_dir: str) -> str:
        subfolder, _, filename = rel.rpartition("/")
        dst = free_path(os.path.join(out_dir, *rel.split("/")))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        self.part = part = dst + ".part"
        params = {"filename": filename, "subfolder": subfolder, "type": "output"}
        try:
            async with session.get(self.url + "/view", params=params) as r:
                r.raise_for_status()
                with open(part, "wb") as f:
                    async for chunk in r.content.iter_chunked(1 << 20):
                        f.write(chunk)
            os.replace(part, dst)
        finally:
            with contextlib.suppress(OSError):
                os.remove(part)
            self.part = None
        return dst


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, prompts: bool, clip: bool = True) -> None:
    if clip:
        p.add_argument("clip", help="the video (mp4, webm, mov, avi, mkv, gif) or a folder of frames")
    if prompts:
        p.add_argument("--source", required=True, help="what the clip shows, e.g. 'a man is playing tennis'")
        p.add_argument("--target", help="what it should show, e.g. 'Spider-Man is playing tennis'")
        p.add_argument("--negative", help="the negative prompt (default: the workflow's)")
    _options(p)


def _options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the workflow's settings (default: the workflow's own, the reference's)")
    g.add_argument("--checkpoint", help="a checkpoint in ComfyUI's models/checkpoints (default: the workflow's)")
    g.add_argument("--frames", type=int, help="load at most this many frames (0 = all)")
    g.add_argument("--size", type=int, help="short side in pixels (512 for SD1.5, 1024 for SDXL; 0 = the clip's)")
    g.add_argument("--steps", type=int, help="DDIM steps of the inversion (the edit uses as many; 50)")
    g.add_argument("--frames-per-pass", type=int, help="frames the UNet computes at a time (0 = as many as fit in "
                                                       "memory); the result is the same")
    g.add_argument("--seed", type=int, help="the edit's seed")
    g.add_argument("--workflow", help="another API-format workflow (a bundled name or a path) to fill in")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set any input: NODE is a node id, a title or a class (all its nodes); repeatable")
    o = p.add_argument_group("output and where it runs")
    o.add_argument("--out", help="folder for the results (default: ComfyUI's output folder; with --server "
                                 "results are downloaded only where --out is given)")
    o.add_argument("--save-frames", action="store_true", help="also save every frame of the result as PNG")
    o.add_argument("--save-inversion", action="store_true",
                   help="also save the inversion (safetensors), to edit the clip again without inverting it")
    o.add_argument("--server", help="queue on this running ComfyUI (e.g. http://127.0.0.1:8188) instead of "
                                    "running ComfyUI in this process")
    o.add_argument("--comfyui", help="the ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI this pack is "
                                     "installed in, ~/ComfyUI)")
    o.add_argument("--comfyui-args", default="", help="ComfyUI's own options for the run, e.g. '--lowvram' or "
                                                      "'--force-fp16' (in-process only)")
    o.add_argument("-v", "--verbose", action="store_true", help="also print ComfyUI's log")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workflows/run.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Edit a video with STEM inversion and TokenFlow or FateZero from the command line: the "
                    "pack's bundled workflows, run by ComfyUI's own executor in this process or queued on a "
                    "running ComfyUI. Results (mp4 through ComfyUI's Save Video) go to --out.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (workflow, what) in COMMANDS.items():
        p = sub.add_parser(command, help=what, description=f"{what} (workflows/api/{workflow}.json).",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
        _common(p, prompts=True)
    p = sub.add_parser("workflow", help="any API-format workflow, with --set overrides",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    p.add_argument("name", help="a bundled workflow's name (" + ", ".join(
        sorted(n[:-5] for n in os.listdir(API_DIR) if n.endswith(".json"))) + ") or a file")
    p.add_argument("--clip", help="the clip for its Load Video Frames node(s)")
    p.add_argument("--source", help="text for its source prompt")
    p.add_argument("--target", help="text for its target prompt")
    p.add_argument("--negative", help="text for its negative prompt")
    _options(p)
    p = sub.add_parser("batch", help="many edits from a CSV or JSON-lines file, in one process",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Runs every row of FILE: columns clip, source, target and optionally command "
                                   "(edit, fatezero, compare), negative, checkpoint, frames, size, steps, "
                                   "frames_per_pass, seed, workflow, name, set (';'-separated NODE.INPUT=VALUE). The "
                                   "options below are the defaults for every row. The checkpoint loads once, and the "
                                   "rows of one clip share its inversion (ComfyUI's cache keeps it while the clip, "
                                   "source prompt and inversion settings stay the same).")
    p.add_argument("file", help="a .csv (header row) or .jsonl file")
    _options(p)
    return parser


def jobs_from(args) -> list[Job]:
    base = dict(checkpoint=args.checkpoint, frames=args.frames, size=args.size, steps=args.steps,
                frames_per_pass=args.frames_per_pass, seed=args.seed, sets=list(args.sets),
                save_inversion=args.save_inversion, save_frames=args.save_frames)
    if args.command == "batch":
        return read_batch(args.file, Job(workflow=args.workflow or COMMANDS["edit"][0], command="edit", **base))
    if args.command == "workflow":
        return [Job(workflow=args.name, command="workflow", clip=args.clip, source=args.source, target=args.target,
                    negative=args.negative, **base)]
    if args.command != "compare" and args.target is None:
        raise UsageError(f"{args.command}: --target is required (what the clip should show)")
    return [Job(workflow=args.workflow or COMMANDS[args.command][0], command=args.command, clip=args.clip,
                source=args.source, target=args.target, negative=args.negative, **base)]


def check_clip(clip: str | None) -> None:
    if clip is not None and not os.path.exists(clip):
        raise UsageError(f"clip not found: {clip} (give the path of a video file or a folder of frames)")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    display = Display()
    try:
        jobs = jobs_from(args)
        for job in jobs:
            check_clip(job.clip)
        prompts = [build_prompt(job, os.path.basename(job.clip.rstrip("/\\")) if job.clip else None) for job in jobs]
        if args.server:
            runner = RemoteComfy(args.server, display)
            out_dir = os.path.abspath(args.out) if args.out else None
        else:
            comfy = find_comfyui(args.comfyui)
            reexec_in_comfyui_python(comfy)
            display.line(f"starting ComfyUI from {comfy} ...")
            runner = LocalComfy(comfy, args.comfyui_args, display, args.verbose)
            out_dir = os.path.abspath(args.out) if args.out else runner.folder_paths.get_output_directory()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    def on_sigint(signum, frame):
        if runner.cancelled:
            print("\nquitting at once", file=sys.stderr)
            runner.discard()
            os._exit(EXIT_CANCELLED)
        print("\nCtrl-C: cancelling (within seconds); press Ctrl-C again to quit at once", file=sys.stderr)
        runner.cancel()

    signal.signal(signal.SIGINT, on_sigint)
    results: list[tuple[Job, Outcome]] = []
    inverted: dict[str, int] = {}  # clip: the prompt that last inverted it
    inversions = 0
    for i, (job, prompt) in enumerate(zip(jobs, prompts), 1):
        what = f"{job.command} {job.clip or ''}".strip() + (f": '{job.source}' -> '{job.target}'" if job.target else "")
        display.line(f"[{i}/{len(jobs)}] {what}" if len(jobs) > 1 else what)
        if runner.cancelled:
            results.append((job, Outcome("cancelled", "not started: cancelled")))
            continue
        try:
            outcome = runner.run(prompt, job.clip, out_dir)
        except UsageError as e:
            outcome = Outcome("invalid", str(e))
        results.append((job, outcome))
        inverts = _of_class(prompt, "STEMInvert")
        if outcome.status == "done" and inverts:
            key = os.path.realpath(job.clip) if job.clip else ""
            if all(k in outcome.cached for k in inverts):
                display.line(f"inversion: reused (ComfyUI's cache kept it from prompt {inverted.get(key, '?')} "
                             "on this clip); not inverted again")
            else:
                inverted[key] = i
                inversions += 1
                display.line("inversion: computed")
        if outcome.status == "done":
            display.line(f"done in {outcome.seconds:.1f} s")
            by_label: dict[str, list[str]] = {}
            for label, path in outcome.files:
                by_label.setdefault(label, []).append(path)
            for label, paths in by_label.items():
                shown = paths[0] if len(paths) == 1 else f"{os.path.dirname(paths[0])} ({len(paths)} files)"
                print(f"{label}: {shown}", flush=True)
        elif outcome.status == "cancelled":
            display.line(outcome.message)
        else:
            display.line(f"error: {outcome.message}")
            if outcome.status == "invalid" and "ckpt_name" in outcome.message:
                have = runner.available_checkpoints()
                if have is not None:
                    display.line(f"checkpoints ComfyUI can see: {', '.join(have) or 'none'}; pass --checkpoint NAME")
    statuses = [o.status for _, o in results]
    if len(results) > 1:
        display.line(f"{statuses.count('done')} of {len(results)} done; {inversions} inversion(s) run for "
                     f"{len(inverted)} clip(s)")
    if "cancelled" in statuses:
        return EXIT_CANCELLED
    if "invalid" in statuses:
        return EXIT_USAGE
    return EXIT_FAILED if "failed" in statuses else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the run started (ComfyUI still loading)
        print("\ncancelled (Ctrl-C) before the run started; nothing was written", file=sys.stderr)
        sys.exit(EXIT_CANCELLED)
