"""Video Metrics inside ComfyUI: plot, table and CSV."""
import csv
import math

import torch

import comfy_harness as harness


def test_video_metrics_plot_table_and_csv(stem_pack, comfy_env):
    node = harness.pack_submodule(stem_pack, "nodes.metrics_node").VideoMetrics()
    frames = torch.from_numpy(harness.synth_frames(6, 64, 48)).float() / 255
    noisy = (frames + 0.05 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    out = node.measure(frames, frames, "exact", video_2=noisy, label_2="noisy", filename_prefix="metrics_test/m")
    plot, table = out["result"]
    assert plot.shape == (1, 512, 768, 3) and plot.dtype == torch.float32
    assert (plot < 0.98).float().mean() > 0.02  # not blank
    assert "| exact | inf |" in table and "| noisy |" in table
    files = list((comfy_env.output_dir / "metrics_test").glob("m_*.csv"))
    assert len(files) == 1
    rows = list(csv.DictReader(open(files[0])))
    assert [r["method"] for r in rows] == ["exact", "noisy"]
    assert math.isinf(float(rows[0]["psnr_db"])) and float(rows[1]["psnr_db"]) < 40
    assert float(rows[0]["ssim"]) == 1.0 and float(rows[0]["warp_error"]) < float(rows[1]["warp_error"])


def test_video_metrics_refuses_a_clip_of_another_size(stem_pack):
    import pytest

    node = harness.pack_submodule(stem_pack, "nodes.metrics_node").VideoMetrics()
    frames = torch.zeros(4, 16, 16, 3)
    with pytest.raises(ValueError, match="video_2"):
        node.measure(frames, frames, "a", video_2=torch.zeros(4, 8, 8, 3))
