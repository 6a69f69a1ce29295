"""Video Metrics: how well reconstructions return the source clip, with a plot and a table."""
from __future__ import annotations

import csv
import os

import torch

from ..stem.metrics import compare, metrics_table, plot_metrics
from .host.pack import CATEGORY, StemError

SLOTS = 3


class VideoMetrics:
    DESCRIPTION = (
        "Compares up to three reconstructions with the source clip: PSNR and SSIM per frame, and a "
        "temporal-consistency warp error (each frame warped to the next with the source's optical "
        "flow; lower is steadier). Outputs a plot and a table of means, and writes a CSV to the "
        "output folder. Connect each reconstruction's inversion to add its time and peak memory."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("plot", "table")
    OUTPUT_TOOLTIPS = ("Per-frame curves and the mean PSNR per method.", "The means (and costs) as a text table.")
    FUNCTION = "measure"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        opt = {}
        for i in range(2, SLOTS + 1):
            opt[f"video_{i}"] = ("IMAGE", {"tooltip": f"Reconstruction {i} (same frame count and size as the source)."})
            opt[f"label_{i}"] = ("STRING", {"default": ["", "STEM", "inflated", "per-frame"][i],
                                            "tooltip": f"Name of reconstruction {i} in the plot and table."})
        for i in range(1, SLOTS + 1):
            opt[f"inversion_{i}"] = ("STEM_INVERSION", {"tooltip": f"The inversion behind reconstruction {i}: adds its time and peak memory."})
        opt["filename_prefix"] = ("STRING", {"default": "stem_metrics/metrics", "tooltip": "Where the CSV goes, in the output folder."})
        return {
            "required": {
                "source": ("IMAGE", {"tooltip": "The source clip's frames."}),
                "video_1": ("IMAGE", {"tooltip": "Reconstruction 1, decoded with VAE Decode."}),
                "label_1": ("STRING", {"default": "per-frame DDIM", "tooltip": "Name of reconstruction 1."}),
            },
            "optional": opt,
        }

    def measure(self, source, video_1, label_1, filename_prefix="stem_metrics/metrics", **kw):
        import folder_paths

        clips, costs = {}, {}
        for i, (video, label) in enumerate([(video_1, label_1)] + [(kw.get(f"video_{i}"), kw.get(f"label_{i}", f"video {i}"))
                                                                   for i in range(2, SLOTS + 1)], start=1):
            if video is None:
                continue
            if tuple(video.shape) != tuple(source.shape):
                raise StemError(f"video_{i}: {tuple(video.shape)} frames differ from the source's {tuple(source.shape)}; "
                                "decode the reconstruction of this clip at this size")
            label = (label or f"video {i}").strip() or f"video {i}"
            if label in clips:
                label = f"{label} ({i})"
            clips[label] = video
            inv = kw.get(f"inversion_{i}")
            if inv is not None:
                costs[label] = {k: inv.settings[k] for k in ("seconds", "peak_mib") if k in inv.settings}
        if source.shape[0] < 2:
            raise StemError("source: at least 2 frames are needed for the warp error")
        results = compare(source.float().cpu(), {k: v.float().cpu() for k, v in clips.items()})
        table, rows = metrics_table(results, costs)
        out_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
        path = os.path.join(out_dir, f"{name}_{counter:05}_.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["method", "psnr_db", "ssim", "warp_error", "seconds", "peak_mib"])
            w.writeheader()
            w.writerows(rows)
        plot = torch.from_numpy(plot_metrics(results)).float().div(255).unsqueeze(0)
        return {"ui": {"text": [table]}, "result": (plot, table)}


NODE_CLASS_MAPPINGS = {"STEMVideoMetrics": VideoMetrics}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMVideoMetrics": "Video Metrics"}
