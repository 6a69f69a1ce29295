"""Random-weight models with the real architectures, built from ComfyUI's own classes (nothing can
be downloaded): a full SD1.5 checkpoint file that CheckpointLoaderSimple loads like any SD1.5
fine-tune, and SDXL UNets of any width. Only the standard library at module level."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import time
import uuid
import zlib
from pathlib import Path

CHECKPOINT_SEED = 20240617

# comfy/model_detection.py (unet_config_from_diffusers_unet, "SD15") for comfy/supported_models.SD15
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# comfy/sd.py, VAE.__init__: "default SD1.x/SD2.x VAE parameters"
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                   "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                   "attn_resolutions": [], "dropout": 0.0}
LOGIT_SCALE = 4.6052  # ln(100), CLIP's value; the only 0-dim parameter (not saved: not transformer.*)


def sd15_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a full SD1.5 checkpoint, read off ComfyUI's own modules built on the meta
    device (no memory, no init)."""
    import torch
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL

    layout: dict[str, tuple[int, ...]] = {}
    unet = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float16, device="meta",
                     operations=comfy.ops.disable_weight_init)
    layout.update({"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()})
    del unet
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    layout.update({"first_stage_model." + k: tuple(v.shape) for k, v in vae.state_dict().items()})
    del vae
    te = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    # an SD1.5 file holds cond_stage_model.transformer.text_model.* only (no text_projection,
    # no logit_scale: SD15.process_clip_state_dict_for_saving drops them too)
    layout.update({"cond_stage_model." + k: tuple(v.shape) for k, v in te.state_dict().items()
                   if k.startswith("transformer.text_model.")})
    del te
    return layout


def init_parameter(name: str, shape: tuple[int, ...], seed: int = CHECKPOINT_SEED):
    """One parameter, seeded by (seed, name) so the result does not depend on the order:
    biases 0; 1-d weights (GroupNorm/LayerNorm) 1; 0-dim scalars LOGIT_SCALE; every matrix or
    conv kernel (and the embeddings) normal with std 1/sqrt(fan_in), fan_in = prod(shape[1:]).
    No extra scaling: measured on this layout (see test_harness), the UNet's activations stay
    below ~20 and its output (eps) has std ~0.5, the VAE decodes to std ~0.6 before the clamp,
    CLIP's last hidden state is layer-normed. Drawn straight in fp16 (normal_ on a half tensor)."""
    import torch
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 0:
        return torch.tensor(LOGIT_SCALE, dtype=torch.float16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    fan_in = math.prod(shape[1:])
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float16).normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)


def write_sd15_checkpoint(path: Path, seed: int = CHECKPOINT_SEED, metadata: dict | None = None) -> int:
    """Write the random SD1.5 checkpoint (fp16 safetensors, ~2.1 GB) to path. Returns the number
    of parameters. Peak memory is about the file size (safetensors writes one dict)."""
    import safetensors.torch
    layout = sd15_layout()
    sd = {k: init_parameter(k, shape, seed) for k, shape in layout.items()}
    n = sum(t.numel() for t in sd.values())
    safetensors.torch.save_file(sd, str(path), metadata=metadata or {})
    return n


def checkpoint_cache_key(seed: int = CHECKPOINT_SEED) -> str:
    """Changes whenever the builder, ComfyUI's version or torch's version changes."""
    import torch
    try:
        import comfyui_version
        cv = comfyui_version.__version__
    except ImportError:
        cv = "?"
    h = hashlib.sha256()
    for obj in (sd15_layout, init_parameter, write_sd15_checkpoint):
        h.update(inspect.getsource(obj).encode())
    h.update(repr((SD15_UNET_CONFIG, SD_VAE_DDCONFIG, LOGIT_SCALE, seed, cv, torch.__version__)).encode())
    return h.hexdigest()[:16]


def checkpoint_cache_dir() -> Path | None:
    """$STEM_TEST_CACHE_DIR (set it to 'off' to build every session), else
    $XDG_CACHE_HOME/comfyui-stem-tests, else ~/.cache/comfyui-stem-tests. Never the repo."""
    v = os.environ.get("STEM_TEST_CACHE_DIR")
    if v is not None:
        return None if v.strip().lower() in ("", "0", "off", "no", "false") else Path(v).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-stem-tests"


def _valid_checkpoint(path: Path, key: str) -> bool:
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("stem_test_key") == key
    except Exception:
        return False


def provide_sd15_checkpoint(checkpoints_dir: Path, seed: int = CHECKPOINT_SEED) -> tuple[str, dict]:
    """Put the random SD1.5 checkpoint into checkpoints_dir and return (file name, info).
    With a cache folder the file is built once (written to a temporary name, then renamed) and
    symlinked here; cached files of other builder versions unused for an hour are deleted.
    info: built (bool), seconds, bytes, path."""
    key = checkpoint_cache_key(seed)
    name = f"stem-test-sd15-random-{key}.safetensors"
    dest = checkpoints_dir / name
    meta = {"stem_test_key": key, "seed": str(seed), "about": "random weights, SD1.5 layout, tests only"}
    t0 = time.perf_counter()
    cache = checkpoint_cache_dir()
    built = False
    if cache is None:
        write_sd15_checkpoint(dest, seed, meta)
        built = True
        target = dest
    else:
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / name
        if not _valid_checkpoint(target, key):
            tmp = cache / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                write_sd15_checkpoint(tmp, seed, meta)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
            built = True
        os.utime(target)  # marks it as in use
        for old in cache.glob("stem-test-sd15-random-*.safetensors"):
            # other versions of the builder: delete them unless a session used one within the hour
            if old.name != name:
                with contextlib.suppress(OSError):
                    if time.time() - old.stat().st_mtime > 3600:
                        old.unlink()
        for stale in cache.glob(".stem-test-sd15-random-*.tmp"):  # from a killed session
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink()
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.symlink_to(target)
    info = {"built": built, "seconds": time.perf_counter() - t0, "bytes": target.stat().st_size,
            "path": str(target)}
    return name, info


def random_sdxl(model_channels: int = 320, num_head_channels: int = 64, seed: int = 0, prediction: str = "eps",
                std: float = 0.05):
    """A ModelPatcher around an SDXL UNet built from ComfyUI's own SDXL config and model classes
    (its block layout and depths: 70 self-attentions), with seeded random weights, fp32. The
    defaults are SDXL's full widths (2.6 B parameters, 10 GB); the tests use small ones."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    import torch

    config = sm.SDXL({
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "dtype": torch.float32, "in_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": num_head_channels,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
        "use_temporal_resblock": False})
    config.unet_config["num_head_channels"] = num_head_channels  # the family's extra config sets 64
    base = config.get_model({"v_pred": torch.zeros(())} if prediction == "v" else {})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def sdxl_conditioning(seed: int, width: int = 64, height: int = 64):
    """CONDITIONING as CLIP Text Encode SDXL gives it (tokens 2048 wide, a 1280-wide pooled
    output, size and crop), random."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 2048, generator=g), {
        "pooled_output": torch.randn(1, 1280, generator=g), "width": width, "height": height, "crop_w": 0,
        "crop_h": 0, "target_width": width, "target_height": height}]]
