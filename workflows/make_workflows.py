"""Builds the bundled workflows, UI format (``workflows/*.json``, what the ComfyUI frontend saves
and loads by drag and drop) and API format (``workflows/api/*.json``, what ``POST /prompt``
takes), from one description per workflow, so that the two cannot drift apart.

    python workflows/make_workflows.py           # rewrite the files
    python workflows/make_workflows.py --check   # exit 1 if a committed file differs

Pure standard library: no ComfyUI, no torch. Each node type's widgets (in the order the
frontend shows and serializes them), sockets and outputs are written out in `NODE_TYPES`;
tests/workflows checks ours against the pack's INPUT_TYPES and the ComfyUI tier checks all of
them against a running server's /object_info.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# Node types: widgets (input name, in INPUT_TYPES order: required, then optional), sockets
# (name, type, optional) and outputs (name, type). ComfyUI 0.3.64 / frontend 1.27.10.
# Frontend conventions mirrored in the UI format:
# * an INT widget named "seed" (or with control_after_generate) is followed in widgets_values
#   by its "control after generate" value ("fixed", "increment", "decrement", "randomize");
# * a combo with video_upload / image_upload gets an "upload" button widget after all other
#   widgets, serialized as the value "image" (as core LoadImage / LoadVideo save it);
# * "Note" exists only in the frontend: it has no API-format counterpart.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    widgets: tuple = ()
    sockets: tuple = ()  # (name, type, optional)
    outputs: tuple = ()  # (name, type)
    control_after: tuple = ()  # widgets followed by a control_after_generate value
    upload: bool = False  # trailing upload widget ("image")
    core: bool = True
    virtual: bool = False  # frontend-only (no API node)


NODE_TYPES: dict[str, NodeType] = {
    # -- ComfyUI core (nodes.py, comfy_extras/) -------------------------------------------------
    "CheckpointLoaderSimple": NodeType(("ckpt_name",), (), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))),
    "CLIPTextEncode": NodeType(("text",), (("clip", "CLIP", False),), (("CONDITIONING", "CONDITIONING"),)),
    "VAEEncode": NodeType((), (("pixels", "IMAGE", False), ("vae", "VAE", False)), (("LATENT", "LATENT"),)),
    "VAEDecode": NodeType((), (("samples", "LATENT", False), ("vae", "VAE", False)), (("IMAGE", "IMAGE"),)),
    "FreeU": NodeType(("b1", "b2", "s1", "s2"), (("model", "MODEL", False),), (("MODEL", "MODEL"),)),
    "KSampler": NodeType(
        ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
        (("model", "MODEL", False), ("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False),
         ("latent_image", "LATENT", False)),
        (("LATENT", "LATENT"),), control_after=("seed",)),
    "ImageStitch": NodeType(("direction", "match_image_size", "spacing_width", "spacing_color"),
                            (("image1", "IMAGE", False), ("image2", "IMAGE", True)), (("IMAGE", "IMAGE"),)),
    "CreateVideo": NodeType(("fps",), (("images", "IMAGE", False), ("audio", "AUDIO", True)), (("VIDEO", "VIDEO"),)),
    "PrimitiveStringMultiline": NodeType(("value",), (), (("STRING", "STRING"),)),
    "SaveVideo": NodeType(("filename_prefix", "format", "codec"), (("video", "VIDEO", False),), ()),
    "Note": NodeType(("text",), (), (), virtual=True),
    "PreviewImage": NodeType((), (("images", "IMAGE", False),), ()),
    # -- this pack (nodes/) --------------------------------------------------------------------
    "STEMLoadVideoFrames": NodeType(
        ("video", "frame_load_cap", "skip_first_frames", "select_every_nth", "size", "crop"), (),
        (("frames", "IMAGE"), ("frame_count", "INT"), ("fps", "FLOAT"), ("width", "INT"), ("height", "INT")),
        upload=True, core=False),
    "STEMAttentionPatch": NodeType(
        ("attention", "num_bases", "em_iters", "tau", "seed", "grouping", "frames_per_group", "frames_per_pass"),
        (("model", "MODEL", False),),
        (("MODEL", "MODEL"),), control_after=("seed",), core=False),
    "STEMVideoMetrics": NodeType(
        ("label_1", "label_2", "label_3", "filename_prefix"),
        (("source", "IMAGE", False), ("video_1", "IMAGE", False), ("video_2", "IMAGE", True), ("video_3", "IMAGE", True),
         ("inversion_1", "STEM_INVERSION", True), ("inversion_2", "STEM_INVERSION", True),
         ("inversion_3", "STEM_INVERSION", True)),
        (("plot", "IMAGE"), ("table", "STRING")), core=False),
    "STEMInvert": NodeType(
        ("steps",), (("model", "MODEL", False), ("latent", "LATENT", False), ("conditioning", "CONDITIONING", False)),
        (("inversion", "STEM_INVERSION"), ("inverted_latent", "LATENT")), core=False),
    "STEMReconstruct": NodeType(
        (), (("model", "MODEL", False), ("inversion", "STEM_INVERSION", False),
             ("conditioning", "CONDITIONING", True), ("source_latent", "LATENT", True)),
        (("LATENT", "LATENT"),), core=False),
    "STEMTokenFlowEdit": NodeType(
        ("cfg", "pnp_attn_t", "pnp_f_t", "batch_size", "seed", "steps", "keyframe_positions", "keyframes_per_pass",
         "pnp_attention_blocks", "pnp_feature_block"),
        (("model", "MODEL", False), ("inversion", "STEM_INVERSION", False), ("positive", "CONDITIONING", False),
         ("negative", "CONDITIONING", False), ("source_conditioning", "CONDITIONING", True),
         ("source_latent", "LATENT", True)),
        (("LATENT", "LATENT"),), control_after=("seed",), core=False),
    "STEMFateZeroEdit": NodeType(
        ("source_prompt", "target_prompt", "negative_prompt", "controller", "cross_replace_steps", "self_replace_steps",
         "cfg", "reweight_words", "reweight", "blend_source_words", "blend_target_words", "blend_threshold",
         "blend_latents", "attention", "seed", "steps", "frames_per_pass"),
        (("model", "MODEL", False), ("clip", "CLIP", False), ("inversion", "STEM_INVERSION", False),
         ("source_latent", "LATENT", True)),
        (("LATENT", "LATENT"),), control_after=("seed",), core=False),
}

# Widget input types, where a link may replace the widget (UI "inputs" entry with "widget").
WIDGET_TYPES = {("CreateVideo", "fps"): "FLOAT", ("CLIPTextEncode", "text"): "STRING",
                ("STEMFateZeroEdit", "source_prompt"): "STRING", ("STEMFateZeroEdit", "target_prompt"): "STRING"}

NEGATIVE = "ugly, blurry, low res, unrealistic, unaesthetic"
DEFAULT_CLIP = "your_clip.mp4"
DEFAULT_CKPT = "v1-5-pruned-emaonly.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"

# ----------------------------------------------------------------------------------------------
# One description per workflow
# ----------------------------------------------------------------------------------------------


@dataclass
class N:
    id: int
    type: str
    pos: tuple
    size: tuple
    widgets: dict = field(default_factory=dict)  # widget name -> value
    links: dict = field(default_factory=dict)  # input name -> (source node id, output slot)
    title: str | None = None
    control: dict = field(default_factory=dict)  # seed widget -> "fixed"/"randomize"/...
    color: str | None = None
    bgcolor: str | None = None


def _load_clip(nid, pos, size=512):
    return N(nid, "STEMLoadVideoFrames", pos, (320, 460),
             {"video": DEFAULT_CLIP, "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1,
              "size": size, "crop": False})


def _save(nid, pos, src, prefix, size=(420, 460), title=None):
    return N(nid, "SaveVideo", pos, size, {"filename_prefix": prefix, "format": "auto", "codec": "auto"},
             {"video": src}, title=title)


def _create_video(nid, pos, images, fps_from):
    return N(nid, "CreateVideo", pos, (270, 78), {"fps": 30.0}, {"images": images, "fps": fps_from})


def _note(nid, pos, size, text):
    return N(nid, "Note", pos, size, {"text": text}, color="#432", bgcolor="#653")


def _ckpt(nid, pos, name=DEFAULT_CKPT):
    return N(nid, "CheckpointLoaderSimple", pos, (320, 98), {"ckpt_name": name})


def _stem_patch(nid, pos, model, attention="stem", title=None):
    return N(nid, "STEMAttentionPatch", pos, (320, 306),
             {"attention": attention, "num_bases": 256, "em_iters": 5, "tau": 0.01, "seed": 1, "grouping": "whole clip",
              "frames_per_group": 8, "frames_per_pass": 0}, {"model": model}, control={"seed": "fixed"}, title=title)


def _prompt(nid, pos, clip, text, title, color=None):
    colors = {"green": ("#232", "#353"), "red": ("#322", "#533")}
    c, bg = colors.get(color, (None, None))
    return N(nid, "CLIPTextEncode", pos, (420, 150), {"text": text}, {"clip": clip}, title=title, color=c, bgcolor=bg)


NOTE_SETUP = (
    "Before you queue:\n"
    "1. Checkpoint: an SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) in ComfyUI/models/checkpoints, "
    "picked in Load Checkpoint. SD2.x and SDXL work too; the SDXL refiner, SD3, Flux and video models are refused.\n"
    "2. Video: put a clip (mp4, webm, mov, avi, mkv, gif, or a folder of frames) in ComfyUI/input/, or use the "
    "upload button of Load Video Frames, and pick it there. size = short side in pixels (512 as in the paper); "
    "frame_load_cap (0 = all), skip_first_frames and select_every_nth pick the frames.\n"
)


def tokenflow_edit():
    text = (
        "STEM inversion + TokenFlow editing (text-guided video editing)\n\n" + NOTE_SETUP +
        "3. Prompts: 'Source prompt' says what the clip shows; 'Target prompt' what it should show. Keep the "
        "negative prompt.\n\n"
        "Defaults are the paper's: 50 inversion steps, 50 editing steps (steps 0 = the inversion's), cfg 7.5, "
        "batch_size 8 (at most the number of frames), pnp 0.5 / 0.8, 256 bases, 5 EM iterations, seed 1. The "
        "STEM patch goes only on the inversion's model; FreeU (1.2, 1.4, 0.9, 0.2) only on the editing model.\n\n"
        "Time: the edit costs about three times the inversion. On a GPU, a 48-frame 512x512 clip takes minutes. "
        "On a CPU expect hours at 512: try size 256 and frame_load_cap 16 first.\n\n"
        "Output: ComfyUI/output/stem/ gets the edited clip (tokenflow_edit_*.mp4) and a side-by-side "
        "comparison, source | edit (tokenflow_compare_*.mp4), at the clip's frame rate."
    )
    freeu = N(9, "FreeU", (860, 300), (320, 130), {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}, {"model": (2, 0)})
    return _edit_graph(text, DEFAULT_CKPT, 512, freeu, "stem/tokenflow")


def sdxl_tokenflow_edit():
    text = (
        "STEM inversion + TokenFlow editing on SDXL\n\n"
        "1. Checkpoint: SDXL base (sd_xl_base_1.0.safetensors) or an SDXL fine-tune in ComfyUI/models/checkpoints, "
        "picked in Load Checkpoint (not the refiner).\n"
        "2. Video: put a clip (mp4, webm, mov, avi, mkv, gif, or a folder of frames) in ComfyUI/input/, or use "
        "the upload button of Load Video Frames. size 1024 is SDXL's native short side; use 768 or 512 where "
        "1024 does not fit (the nodes refuse a run that would not fit, with the estimate).\n"
        "3. Prompts: source (what the clip shows), target (what it should show), negative.\n\n"
        "UNTUNED: the mechanics are tested on SDXL's layout, but the quality on SDXL has not been judged (no real "
        "weights were available to us), and the PnP layers follow the reference's rule (SDXL output blocks 1-5, "
        "features at output block 1; TokenFlow Edit's advanced inputs move them). No FreeU here: its SD1.5 "
        "values do not carry over.\n\n"
        "Defaults otherwise the paper's: 50 + 50 steps, cfg 7.5, batch_size 8, pnp 0.5 / 0.8, 256 bases.\n\n"
        "Time: SDXL at 1024 has 16 times SD1.5-at-512's latent tokens at its first level and a heavier UNet: "
        "this wants a GPU with plenty of memory; frames_per_pass (STEM Attention Patch) and keyframes_per_pass "
        "(TokenFlow Edit) bound the memory of long clips.\n\n"
        "Output: ComfyUI/output/stem/ gets sdxl_tokenflow_edit_*.mp4 and sdxl_tokenflow_compare_*.mp4."
    )
    return _edit_graph(text, SDXL_CKPT, 1024, None, "stem/sdxl_tokenflow")


def _edit_graph(text, ckpt, size, freeu, prefix):
    """Load Checkpoint -> Load Video Frames -> VAE Encode -> STEM Attention Patch -> STEM Invert
    -> TokenFlow Edit (on ``freeu``'s model where given) -> VAE Decode -> saved videos."""
    edit_model = (9, 0) if freeu is not None else (2, 0)
    nodes = [
        _note(1, (-480, 0), (440, 620), text),
        _ckpt(2, (0, 0), ckpt),
        _load_clip(3, (0, 150), size),
        _prompt(4, (380, 0), (2, 1), "a man is playing tennis", "Source prompt (what the clip shows)"),
        _prompt(5, (380, 190), (2, 1), "Spider-Man is playing tennis", "Target prompt (what it should show)", "green"),
        _prompt(6, (380, 380), (2, 1), NEGATIVE, "Negative prompt", "red"),
        N(7, "VAEEncode", (380, 570), (210, 46), {}, {"pixels": (3, 0), "vae": (2, 2)}),
        _stem_patch(8, (860, 0), (2, 0)),
        *([freeu] if freeu is not None else []),
        N(10, "STEMInvert", (1240, 0), (320, 120), {"steps": 50},
          {"model": (8, 0), "latent": (7, 0), "conditioning": (4, 0)}),
        N(11, "STEMTokenFlowEdit", (1240, 180), (340, 330),
          {"cfg": 7.5, "pnp_attn_t": 0.5, "pnp_f_t": 0.8, "batch_size": 8, "seed": 1, "steps": 0,
           "keyframe_positions": "reference (batch middle)", "keyframes_per_pass": 0, "pnp_attention_blocks": "auto",
           "pnp_feature_block": -1},
          {"model": edit_model, "inversion": (10, 0), "positive": (5, 0), "negative": (6, 0), "source_latent": (7, 0)},
          control={"seed": "fixed"}),
        N(12, "VAEDecode", (1620, 180), (210, 46), {}, {"samples": (11, 0), "vae": (2, 2)}),
        _create_video(13, (1620, 270), (12, 0), (3, 2)),
        _save(14, (1920, 0), (13, 0), f"{prefix}_edit", title="Save Video (edit)"),
        N(15, "ImageStitch", (1620, 400), (270, 150),
          {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
          {"image1": (3, 0), "image2": (12, 0)}, title="Side by side: source | edit"),
        _create_video(16, (1620, 590), (15, 0), (3, 2)),
        _save(17, (2360, 0), (16, 0), f"{prefix}_compare", (640, 460), title="Save Video (source | edit)"),
    ]
    return nodes


def inversion_reconstruction():
    text = (
        "Per-frame DDIM vs. inflated DDIM vs. STEM inversion (the STEM paper's comparison)\n\n" + NOTE_SETUP +
        "3. Source prompt: what the clip shows.\n\n"
        "One clip is inverted three ways, 50 DDIM steps without guidance each: plain per-frame attention "
        "(what editors use today), inflated attention (every frame attends to every frame: memory grows with "
        "the square of the frame count, and the node refuses a clip that would not fit), and STEM (256 bases "
        "for the whole clip). Each is sampled back down with STEM Reconstruct on the model that inverted it. "
        "Video Metrics compares the three with the source: PSNR and SSIM per frame (higher is closer) and a "
        "warp error (lower is steadier), with each inversion's time and peak memory. With real SD1.5 weights "
        "STEM should come close to inflated and beat per-frame, at a fraction of inflated's memory.\n\n"
        "Output: ComfyUI/output/stem/inversion_compare_*.mp4 (source | STEM | DDIM | inflated), the plot in "
        "the preview, and stem/inversion_metrics_*.csv.\n\n"
        "Time: six passes of 50 steps (three inversions, three reconstructions); minutes on a GPU at 512, much "
        "longer on a CPU (try size 256, frame_load_cap 16)."
    )
    nodes = [
        _note(1, (-480, 0), (440, 640), text),
        _ckpt(2, (0, 0)),
        _load_clip(3, (0, 150)),
        _prompt(4, (380, 0), (2, 1), "a man is playing tennis", "Source prompt (what the clip shows)"),
        N(5, "VAEEncode", (380, 190), (210, 46), {}, {"pixels": (3, 0), "vae": (2, 2)}),
        _stem_patch(6, (860, 0), (2, 0)),
        N(7, "STEMInvert", (1240, 0), (320, 120), {"steps": 50},
          {"model": (6, 0), "latent": (5, 0), "conditioning": (4, 0)}, title="STEM Invert (STEM)"),
        N(8, "STEMReconstruct", (1620, 0), (300, 110), {}, {"model": (6, 0), "inversion": (7, 0),
                                                            "source_latent": (5, 0)},
          title="STEM Reconstruct (STEM)"),
        N(9, "VAEDecode", (1960, 0), (210, 46), {}, {"samples": (8, 0), "vae": (2, 2)}),
        N(10, "STEMInvert", (1240, 300), (320, 120), {"steps": 50},
          {"model": (2, 0), "latent": (5, 0), "conditioning": (4, 0)}, title="STEM Invert (plain DDIM)"),
        N(11, "STEMReconstruct", (1620, 300), (300, 110), {}, {"model": (2, 0), "inversion": (10, 0),
                                                               "source_latent": (5, 0)},
          title="STEM Reconstruct (plain DDIM)"),
        N(12, "VAEDecode", (1960, 300), (210, 46), {}, {"samples": (11, 0), "vae": (2, 2)}),
        N(13, "ImageStitch", (2220, 0), (270, 150),
          {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
          {"image1": (3, 0), "image2": (9, 0)}, title="source | STEM"),
        N(14, "ImageStitch", (2220, 200), (270, 150),
          {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
          {"image1": (13, 0), "image2": (12, 0)}, title="source | STEM | DDIM"),
        _create_video(15, (2220, 620), (21, 0), (3, 2)),
        _save(16, (2540, 0), (15, 0), "stem/inversion_compare", (760, 420),
              title="Save Video (source | STEM | DDIM | inflated)"),
        _stem_patch(17, (860, 520), (2, 0), attention="inflated", title="STEM Attention Patch (inflated)"),
        N(18, "STEMInvert", (1240, 520), (320, 120), {"steps": 50},
          {"model": (17, 0), "latent": (5, 0), "conditioning": (4, 0)}, title="STEM Invert (inflated)"),
        N(19, "STEMReconstruct", (1620, 520), (300, 110), {}, {"model": (17, 0), "inversion": (18, 0),
                                                               "source_latent": (5, 0)},
          title="STEM Reconstruct (inflated)"),
        N(20, "VAEDecode", (1960, 520), (210, 46), {}, {"samples": (19, 0), "vae": (2, 2)}),
        N(21, "ImageStitch", (2220, 400), (270, 150),
          {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
          {"image1": (14, 0), "image2": (20, 0)}, title="source | STEM | DDIM | inflated"),
        N(22, "STEMVideoMetrics", (1960, 700), (320, 260),
          {"label_1": "per-frame DDIM", "label_2": "STEM", "label_3": "inflated",
           "filename_prefix": "stem/inversion_metrics"},
          {"source": (3, 0), "video_1": (12, 0), "video_2": (9, 0), "video_3": (20, 0),
           "inversion_1": (10, 0), "inversion_2": (7, 0), "inversion_3": (18, 0)}),
        N(23, "PreviewImage", (2540, 480), (760, 520), {}, {"images": (22, 0)}, title="Metrics plot"),
    ]
    return nodes


def attention_ksampler():
    text = (
        "STEM attention on a plain KSampler (video-to-video)\n\n" + NOTE_SETUP +
        "3. Prompts: what the result should look like, and a negative prompt.\n\n"
        "Every frame is encoded, noised to denoise 0.6 and sampled in one batch; the STEM patch makes every "
        "frame's self-attention read the same bases of the whole clip, which keeps the frames consistent. "
        "Lower denoise keeps more of the source; the seed is fixed so reruns match.\n\n"
        "Output: ComfyUI/output/stem/ksampler_stem_*.mp4 and a side-by-side comparison, source | result "
        "(ksampler_compare_*.mp4).\n\n"
        "Time: 20 UNet steps over all frames at once (KSampler runs every step at any denoise; denoise only "
        "sets the noise level it starts from); seconds to minutes on a GPU at 512, "
        "much longer on a CPU (try size 256, frame_load_cap 16)."
    )
    nodes = [
        _note(1, (-480, 0), (440, 560), text),
        _ckpt(2, (0, 0)),
        _load_clip(3, (0, 150)),
        _prompt(4, (380, 0), (2, 1), "a watercolor painting of a man playing tennis", "Positive prompt", "green"),
        _prompt(5, (380, 190), (2, 1), NEGATIVE, "Negative prompt", "red"),
        N(6, "VAEEncode", (380, 380), (210, 46), {}, {"pixels": (3, 0), "vae": (2, 2)}),
        _stem_patch(7, (860, 0), (2, 0)),
        N(8, "KSampler", (1240, 0), (320, 262),
          {"seed": 1, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.6},
          {"model": (7, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
          control={"seed": "fixed"}),
        N(9, "VAEDecode", (1600, 0), (210, 46), {}, {"samples": (8, 0), "vae": (2, 2)}),
        _create_video(10, (1600, 90), (9, 0), (3, 2)),
        _save(11, (1900, 0), (10, 0), "stem/ksampler_stem", title="Save Video (result)"),
        N(12, "ImageStitch", (1600, 220), (270, 150),
          {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
          {"image1": (3, 0), "image2": (9, 0)}, title="Side by side: source | result"),
        _create_video(13, (1600, 410), (12, 0), (3, 2)),
        _save(14, (2360, 0), (13, 0), "stem/ksampler_compare", (640, 460), title="Save Video (source | result)"),
    ]
    return nodes


def fatezero_edit():
    text = (
        "STEM inversion, edited by TokenFlow and by FateZero (the STEM paper's two editors)\n\n" + NOTE_SETUP +
        "3. Prompts: 'Source text' says what the clip shows, 'Target text' what it should show; both editors "
        "read them. FateZero's refine controller aligns the target's words with the source's: add words (a "
        "style) or change some (for a word swap of as many words, choose 'replace').\n\n"
        "One STEM inversion (50 steps, 256 bases) feeds both. TokenFlow Edit: the paper's defaults, FreeU on "
        "its model. FateZero Edit: FateZero's zero-shot style defaults: refine, cross-attention from the "
        "source in the first 0.8 of the steps, self-attention in the first 0.7, the style words reweighted "
        "x10, an empty negative prompt. With a STEM inversion its fused self-attention is the source's bases "
        "on the edit's values; its memory does not grow with the steps (the source's maps are recomputed). "
        "For a shape edit, name the object in blend_source_words (and blend_target_words) to fuse only "
        "outside it.\n\n"
        "Video Metrics compares the two edits with the source: warp error (lower is steadier), and PSNR/SSIM "
        "(how much of the source each keeps).\n\n"
        "Output: ComfyUI/output/stem/ gets fatezero_edit_*.mp4 and edit_compare_*.mp4 (source | TokenFlow | "
        "FateZero), the plot in the preview, and edit_metrics_*.csv.\n\n"
        "Time: each editor costs about three times the inversion; on a CPU try size 256 and frame_load_cap 16."
    )
    source, target = "a man is playing tennis", "a man is playing tennis, watercolor painting"
    return [
        _note(1, (-480, 0), (440, 700), text),
        _ckpt(2, (0, 0)),
        _load_clip(3, (0, 150)),
        N(4, "PrimitiveStringMultiline", (380, 0), (420, 120), {"value": source}, title="Source text"),
        N(5, "PrimitiveStringMultiline", (380, 150), (420, 120), {"value": target}, title="Target text",
          color="#232", bgcolor="#353"),
        _prompt(6, (380, 600), (2, 1), NEGATIVE, "Negative prompt (TokenFlow)", "red"),
        N(7, "CLIPTextEncode", (380, 300), (420, 100), {"text": source}, {"clip": (2, 1), "text": (4, 0)},
          title="Source prompt"),
        N(8, "CLIPTextEncode", (380, 450), (420, 100), {"text": target}, {"clip": (2, 1), "text": (5, 0)},
          title="Target prompt", color="#232", bgcolor="#353"),
        N(9, "VAEEncode", (380, 800), (210, 46), {}, {"pixels": (3, 0), "vae": (2, 2)}),
        _stem_patch(10, (860, 0), (2, 0)),
        N(11, "STEMInvert", (1240, 0), (320, 120), {"steps": 50},
          {"model": (10, 0), "latent": (9, 0), "conditioning": (7, 0)}),
        N(12, "FreeU", (860, 330), (320, 130), {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}, {"model": (2, 0)}),
        N(13, "STEMTokenFlowEdit", (1240, 180), (340, 330),
          {"cfg": 7.5, "pnp_attn_t": 0.5, "pnp_f_t": 0.8, "batch_size": 8, "seed": 1, "steps": 0,
           "keyframe_positions": "reference (batch middle)", "keyframes_per_pass": 0, "pnp_attention_blocks": "auto",
           "pnp_feature_block": -1},
          {"model": (12, 0), "inversion": (11, 0), "positive": (8, 0), "negative": (6, 0), "source_latent": (9, 0)},
          control={"seed": "fixed"}),
        N(14, "STEMFateZeroEdit", (1240, 560), (360, 560),
          {"source_prompt": source, "target_prompt": target, "negative_prompt": "", "controller": "refine",
           "cross_replace_steps": 0.8, "self_replace_steps": 0.7, "cfg": 7.5, "reweight_words": "watercolor painting",
           "reweight": 10.0, "blend_source_words": "", "blend_target_words": "", "blend_threshold": 0.3,
           "blend_latents": False, "attention": "as the inversion", "seed": 1, "steps": 0, "frames_per_pass": 0},
          {"model": (2, 0), "clip": (2, 1), "inversion": (11, 0), "source_prompt": (4, 0), "target_prompt": (5, 0),
           "source_latent": (9, 0)}, control={"seed": "fixed"}),
        N(15, "VAEDecode", (1640, 180), (210, 46), {}, {"samples": (13, 0), "vae": (2, 2)}, title="VAE Decode (TokenFlow)"),
        N(16, "VAEDecode", (1640, 560), (210, 46), {}, {"samples": (14, 0), "vae": (2, 2)}, title="VAE Decode (FateZero)"),
        N(17, "ImageStitch", (1900, 180), (270, 150),
          {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
          {"image1": (3, 0), "image2": (15, 0)}, title="source | TokenFlow"),
        N(18, "ImageStitch", (1900, 380), (270, 150),
          {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"},
          {"image1": (17, 0), "image2": (16, 0)}, title="source | TokenFlow | FateZero"),
        _create_video(19, (1900, 580), (18, 0), (3, 2)),
        _save(20, (2220, 0), (19, 0), "stem/edit_compare", (760, 420), title="Save Video (source | TokenFlow | FateZero)"),
        _create_video(21, (1900, 700), (16, 0), (3, 2)),
        _save(22, (2220, 460), (21, 0), "stem/fatezero_edit", title="Save Video (FateZero)"),
        N(23, "STEMVideoMetrics", (1640, 820), (320, 260),
          {"label_1": "TokenFlow", "label_2": "FateZero", "label_3": "", "filename_prefix": "stem/edit_metrics"},
          {"source": (3, 0), "video_1": (15, 0), "video_2": (16, 0)}),
        N(24, "PreviewImage", (2220, 960), (760, 520), {}, {"images": (23, 0)}, title="Metrics plot"),
    ]


WORKFLOWS = {
    "stem_tokenflow_edit": tokenflow_edit,
    "stem_fatezero_edit": fatezero_edit,
    "stem_sdxl_tokenflow_edit": sdxl_tokenflow_edit,
    "stem_inversion_reconstruction": inversion_reconstruction,
    "stem_attention_ksampler": attention_ksampler,
}

# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _check(nodes: list[N]) -> dict[int, N]:
    by_id = {}
    for n in nodes:
        if n.id in by_id:
            raise ValueError(f"duplicate node id {n.id}")
        if n.type not in NODE_TYPES:
            raise ValueError(f"node {n.id}: unknown type {n.type}")
        t = NODE_TYPES[n.type]
        if set(n.widgets) != set(t.widgets):
            raise ValueError(f"node {n.id} ({n.type}): widgets {sorted(n.widgets)} != {sorted(t.widgets)}")
        sockets = {s[0] for s in t.sockets}
        for name in n.links:
            if name not in sockets and (n.type, name) not in WIDGET_TYPES:
                raise ValueError(f"node {n.id} ({n.type}): no input {name!r} to link")
        for name, _, optional in t.sockets:
            if not optional and name not in n.links:
                raise ValueError(f"node {n.id} ({n.type}): required input {name!r} is not linked")
        by_id[n.id] = n
    return by_id


def _order(nodes: list[N]) -> dict[int, int]:
    """Execution order as the frontend stores it: a topological order, ties by id."""
    deps = {n.id: {src for src, _ in n.links.values()} for n in nodes}
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(i for i in deps if i not in done and deps[i] <= done)
        if not ready:
            raise ValueError("the workflow has a cycle")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


def widgets_values(n: N) -> list:
    t = NODE_TYPES[n.type]
    values = []
    for w in t.widgets:
        values.append(n.widgets[w])
        if w in t.control_after:
            values.append(n.control.get(w, "fixed"))
    if t.upload:
        values.append("image")
    return values


def build_ui(nodes: list[N]) -> dict:
    by_id = _check(nodes)
    order = _order(nodes)
    links = []  # [id, from_node, from_slot, to_node, to_slot, type]
    in_link: dict[tuple[int, str], int] = {}
    out_links: dict[tuple[int, int], list[int]] = {}
    for n in sorted(nodes, key=lambda n: n.id):
        t = NODE_TYPES[n.type]
        names = [s[0] for s in t.sockets] + [w for w in t.widgets if w in n.links]
        for name in sorted(n.links, key=names.index):
            src, slot = n.links[name]
            typ = NODE_TYPES[by_id[src].type].outputs[slot][1]
            lid = len(links) + 1
            links.append([lid, src, slot, n.id, names.index(name), typ])
            in_link[(n.id, name)] = lid
            out_links.setdefault((src, slot), []).append(lid)
    ui_nodes = []
    for n in sorted(nodes, key=lambda n: n.id):
        t = NODE_TYPES[n.type]
        inputs = []
        for name, typ, optional in t.sockets:
            entry = {"name": name, "type": typ}
            if optional:
                entry["shape"] = 7
            entry["link"] = in_link.get((n.id, name))
            inputs.append(entry)
        for w in t.widgets:
            if w in n.links:
                inputs.append({"name": w, "type": WIDGET_TYPES[(n.type, w)], "widget": {"name": w},
                               "link": in_link[(n.id, w)]})
        outputs = [{"name": name, "type": typ, "links": out_links.get((n.id, i), []), "slot_index": i}
                   for i, (name, typ) in enumerate(t.outputs)]
        node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                "order": order[n.id], "mode": 0, "inputs": inputs, "outputs": outputs}
        if n.title:
            node["title"] = n.title
        node["properties"] = {} if t.virtual else {"Node name for S&R": n.type}
        if t.core and not t.virtual:
            node["properties"].update({"cnr_id": "comfy-core", "ver": "0.3.64"})
        node["widgets_values"] = widgets_values(n)
        if n.color:
            node["color"] = n.color
        if n.bgcolor:
            node["bgcolor"] = n.bgcolor
        ui_nodes.append(node)
    return {
        "last_node_id": max(by_id),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [520, 80]}},
        "version": 0.4,
    }


def build_api(nodes: list[N]) -> dict:
    _check(nodes)
    api = {}
    for n in sorted(nodes, key=lambda n: n.id):
        t = NODE_TYPES[n.type]
        if t.virtual:
            continue
        inputs = {}
        for name in [s[0] for s in t.sockets] + list(t.widgets):
            if name in n.links:
                src, slot = n.links[name]
                inputs[name] = [str(src), slot]
            elif name in n.widgets:
                inputs[name] = n.widgets[name]
        entry = {"inputs": inputs, "class_type": n.type}
        if n.title:
            entry["_meta"] = {"title": n.title}
        api[str(n.id)] = entry
    return api


def render(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def expected_files() -> dict[Path, str]:
    """Every generated file (path -> text)."""
    files = {}
    for name, make in WORKFLOWS.items():
        nodes = make()
        files[HERE / f"{name}.json"] = render(build_ui(nodes))
        files[HERE / "api" / f"{name}.json"] = render(build_api(nodes))
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs")
    args = ap.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    rel = [str(p.relative_to(HERE.parent)) for p in stale]
    if args.check:
        if rel:
            print("out of date (run python workflows/make_workflows.py):", *rel, sep="\n  ")
            return 1
        print("workflows are up to date")
        return 0
    print("wrote:", *rel, sep="\n  ") if rel else print("nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
