"""TokenFlow Edit: keyframes edited jointly with PnP injection, then propagated (REFERENCE §5).

Design note: the source branch has its own latent (the inversion's), so one step is four
ComfyUI model calls instead of the reference's single three-branch call: keyframe source,
keyframe edit (uncond + cond), then per batch: propagation source, propagation edit. The
source calls record what the edit calls read. All of it goes through ComfyUI's own
``calc_cond_batch`` on a patched clone, so FreeU, LoRA and ControlNet on the conds keep
working, and any ``cond_or_uncond`` layout (batched, separate, reordered) is handled.
"""
from __future__ import annotations

import logging

import torch

from ..stem.attention import full_attention, pnp_substitute
from ..stem.ddim import ddim_timesteps
from ..stem.inversion import Inversion
from ..stem.tokenflow import batch_ranges, nearest_neighbour_field, propagate, propagation_weights, sample_keyframes
from .common import (
    CATEGORY,
    StemError,
    attn1_sites,
    check_model,
    ddim_sampler,
    interrupted,
    model_fingerprint,
    progress_callback,
    refuse_split_frames,
)
from .inversion_nodes import inversion_conditioning, latent_frames

log = logging.getLogger("ComfyUI-STEM")

# REFERENCE §5.2: decoder self-attentions 4..11 get the source's q and k; the residual branch
# of output_blocks[4][0] (diffusers up_blocks[1].resnets[1]) gets the source's features.
PNP_ATTN_OUTPUT_BLOCKS = range(4, 12)
PNP_FEATURE_MODULE = "diffusion_model.output_blocks.4.0.out_layers"

SOURCE = "source"


class EditState:
    """Per-run state the patches read and write. Never deep-copied: ``clone()`` copies the
    model options that refer to it, and the recorded tensors must stay shared."""

    def __init__(self, batch_size: int, pnp_attn_steps: int, pnp_f_steps: int, use_true_positions: bool):
        self.batch_size = batch_size
        self.pnp_attn_steps = pnp_attn_steps
        self.pnp_f_steps = pnp_f_steps
        self.use_true_positions = use_true_positions
        self.step = 0
        self.mode = "off"  # kf_src, kf_edit, prop_src, prop_edit
        self.batch = 0
        self.batch_frames = 0
        self.keyframes: torch.Tensor | None = None
        self.reset()
        self.calls: dict = {}  # (mode, hook, block key) -> count, for tests and debugging

    def reset(self) -> None:
        self.kf_norm: dict = {}  # block key -> source norm1(x) of keyframes [K, N, C]
        self.kf_qk: dict = {}  # block key -> (q, k) of the source keyframes
        self.kf_out: dict = {}  # block key -> {SOURCE | cond index: [K, N, C]}
        self.nn: dict = {}  # block key -> (idx_b, idx_prev, weights)
        self.features: torch.Tensor | None = None  # source residual branch of output_blocks[4][0]

    def __deepcopy__(self, memo):
        return self

    def count(self, hook: str, key) -> None:
        k = (self.step, self.mode, hook, key)
        self.calls[k] = self.calls.get(k, 0) + 1

    @property
    def attn_injection(self) -> bool:
        return self.step < self.pnp_attn_steps

    @property
    def feature_injection(self) -> bool:
        return self.step < self.pnp_f_steps


def _key(extra_options) -> tuple:
    block = extra_options["block"]
    return (block[0], int(block[1]), int(extra_options.get("block_index", 0)))


def _chunks(x: torch.Tensor, extra_options) -> list[tuple[object, torch.Tensor]]:
    cu = extra_options.get("cond_or_uncond") or [0]
    return list(zip(cu, x.chunk(len(cu))))


def make_patches(state: EditState):
    """attn1 patch (norm1 input), attn1 replacement (q, k, v) and attn1 output patch."""
    from comfy.ldm.modules.attention import optimized_attention

    def norm_patch(n, context, value, extra_options):
        refuse_split_frames(extra_options)
        key = _key(extra_options)
        state.count("norm", key)
        if state.mode == "kf_src":
            state.kf_norm[key] = n
        elif state.mode == "prop_src":
            # REFERENCE §5.4: nearest neighbours by cosine of the SOURCE norm1(x), one field per keyframe
            b = state.batch
            idx_b = nearest_neighbour_field(n, state.kf_norm[key][b])
            if b > 0:
                idx_prev = nearest_neighbour_field(n, state.kf_norm[key][b - 1])
                frames = b * state.batch_size + torch.arange(n.shape[0], device=n.device)
                w = propagation_weights(frames, b, state.batch_size, state.keyframes, state.use_true_positions)
                state.nn[key] = (idx_b, idx_prev, w)
            else:
                state.nn[key] = (idx_b, None, None)
        return n, context, value

    def attn_replace(q, k, v, extra_options):
        key = _key(extra_options)
        state.count("attn", key)
        heads = extra_options["n_heads"]
        pnp_block = key[0] == "output" and key[1] in PNP_ATTN_OUTPUT_BLOCKS and state.attn_injection
        if state.mode == "kf_src":
            if pnp_block:
                state.kf_qk[key] = (q, k)
            return optimized_attention(q, k, v, heads)  # the source keeps per-frame attention
        if state.mode == "kf_edit":
            inject = [True] * len(extra_options.get("cond_or_uncond") or [0])
            if pnp_block:
                sq, sk = state.kf_qk[key]
                q, k = pnp_substitute(q, sq, inject), pnp_substitute(k, sk, inject)
            # extended attention: every keyframe of a chunk attends to all keyframes of that chunk
            return full_attention(q, k, v, heads, num_chunks=len(inject))
        # propagation pass: no self-attention; the output patch supplies it
        return torch.zeros_like(q)

    def output_patch(n, extra_options):
        key = _key(extra_options)
        state.count("out", key)
        if state.mode == "kf_src":
            state.kf_out.setdefault(key, {})[SOURCE] = n
            return n
        if state.mode == "kf_edit":
            for c, part in _chunks(n, extra_options):
                state.kf_out[key][c] = part
            return n
        idx_b, idx_prev, w = state.nn[key]
        b = state.batch
        if state.mode == "prop_src":
            sources = [SOURCE]
        else:
            sources = [c for c, _ in _chunks(n, extra_options)]
        outs = []
        for c in sources:
            kf = state.kf_out[key][c]  # [K, N, C]
            prev = kf[b - 1 : b] if b > 0 else None
            outs.append(propagate(kf[b : b + 1], idx_b, prev, idx_prev, w)[0])
        return torch.cat(outs).to(n.dtype)

    return norm_patch, attn_replace, output_patch


class FeatureInjection(torch.nn.Sequential):
    """``out_layers`` of output_blocks[4][0] with the PnP feature injection (REFERENCE §5.2).

    It holds the original layers under their own names, so weight patches (LoRA) that address
    ``...out_layers.3.weight`` still find them. Installed with ``add_object_patch``.
    """

    def __init__(self, original: torch.nn.Sequential, state: EditState):
        super().__init__(*original)
        self.state = state

    def forward(self, h):
        h = super().forward(h)
        st = self.state
        st.count("features", PNP_FEATURE_MODULE)
        if st.mode in ("kf_src", "prop_src"):
            st.features = h
        elif st.mode in ("kf_edit", "prop_edit") and st.feature_injection and st.features is not None:
            reps = h.shape[0] // st.features.shape[0]
            h = st.features.repeat(reps, *([1] * (h.ndim - 1))).to(h.dtype)
        return h


def build_edit_model(model, state: EditState):
    m = model.clone()
    norm_patch, attn_replace, output_patch = make_patches(state)
    m.set_model_attn1_patch(norm_patch)
    for block, idx, tidx in attn1_sites(m):
        m.set_model_attn1_replace(attn_replace, block, idx, tidx)
    m.set_model_attn1_output_patch(output_patch)
    m.add_object_patch(PNP_FEATURE_MODULE, FeatureInjection(m.get_model_object(PNP_FEATURE_MODULE), state))
    return m


def edit_levels(inv: Inversion, steps: int) -> tuple[list[int], list[float]]:
    """Editing timesteps (noisiest first) and their levels plus the final one, taken from the
    inversion so that the source branch always has its latent at the same level."""
    ts = ddim_timesteps(steps)
    missing = [t for t in ts if t not in inv.timesteps]
    if missing:
        raise StemError(
            f"steps: {steps} editing steps need timesteps {missing[:4]}... that the {inv.steps}-step inversion "
            f"does not have; use {inv.steps} steps, or a count whose spacing is a multiple of the inversion's "
            f"(e.g. {inv.steps // 2 if inv.steps % 2 == 0 else inv.steps})"
        )
    sig = inv.sigmas.tolist()
    levels = [sig[1 + inv.timesteps.index(t)] for t in ts] + [sig[0]]
    return ts, levels


def tokenflow_guider(model, state: EditState, inv: Inversion, source_cond, positive, negative, cfg: float, timesteps, seed: int):
    import comfy.samplers

    class TokenFlowGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            F = x.shape[0]
            bs = state.batch_size
            t = timesteps[state.step]
            src = self.inner_model.process_latent_in(inv.latent_at(t).to(x.device, x.dtype))
            state.reset()
            state.keyframes = sample_keyframes(F, bs, generator)
            kf = state.keyframes.tolist()
            conds_edit = [self.conds.get("positive"), self.conds.get("negative") if cfg != 1.0 else None]
            calc = comfy.samplers.calc_cond_batch

            state.mode = "kf_src"
            calc(self.inner_model, [self.conds[SOURCE]], src[kf], timestep[: len(kf)], model_options)
            state.mode = "kf_edit"
            calc(self.inner_model, conds_edit, x[kf], timestep[: len(kf)], model_options)

            denoised = torch.empty_like(x)
            for b, frames in enumerate(batch_ranges(F, bs)):
                interrupted()
                sl = slice(frames.start, frames.stop)
                state.batch = b
                state.mode = "prop_src"
                calc(self.inner_model, [self.conds[SOURCE]], src[sl], timestep[sl], model_options)
                state.mode = "prop_edit"
                cond, uncond = calc(self.inner_model, conds_edit, x[sl], timestep[sl], model_options)
                if conds_edit[1] is None:
                    denoised[sl] = cond
                else:
                    denoised[sl] = comfy.samplers.cfg_function(
                        self.inner_model, cond, uncond, cfg, x[sl], timestep[sl], model_options=model_options,
                        cond=conds_edit[0], uncond=conds_edit[1])
            state.mode = "off"
            state.reset()
            return denoised

    generator = torch.Generator().manual_seed(int(seed))
    g = TokenFlowGuider(model)
    g.inner_set_conds({"positive": positive, "negative": negative, SOURCE: source_cond})
    g.set_cfg(cfg)
    return g


def tokenflow_edit(model, inv: Inversion, positive, negative, cfg=7.5, pnp_attn_t=0.5, pnp_f_t=0.8,
                   batch_size=8, seed=1, steps=None, source_conditioning=None, use_true_keyframe_positions=False):
    check_model(model)
    steps = steps or inv.steps
    if inv.num_frames < batch_size:
        raise StemError(
            f"batch_size: the clip has {inv.num_frames} frames, fewer than batch_size {batch_size}; "
            f"lower batch_size to at most {inv.num_frames} or load more frames"
        )
    fp = inv.settings.get("model_fingerprint")
    if fp and fp != model_fingerprint(model):
        log.warning("TokenFlow Edit: the model's weights differ from the inversion's model (fine for a LoRA edit)")
    ts, levels = edit_levels(inv, steps)
    state = EditState(batch_size, int(steps * pnp_attn_t), int(steps * pnp_f_t), use_true_keyframe_positions)
    m = build_edit_model(model, state)
    source_cond = source_conditioning if source_conditioning is not None else inversion_conditioning(inv)
    g = tokenflow_guider(m, state, inv, source_cond, positive, negative, cfg, ts, seed)

    def on_step(i):
        state.step = i

    start = inv.noisiest.clone()
    out = g.sample(torch.zeros_like(start), start, ddim_sampler(on_step), torch.tensor(levels, dtype=torch.float32),
                   callback=progress_callback(model, steps), disable_pbar=True, seed=seed)
    return out, state


class TokenFlowEdit:
    DESCRIPTION = (
        "TokenFlow editing (Geyer et al., ICLR 2024) from an inversion: each step edits one random "
        "keyframe per batch jointly (extended attention, plug-and-play injection of the source's "
        "attention and features), then propagates the edit to every frame through nearest-neighbour "
        "correspondences of the source. For the reference's look, put FreeU (b1 1.2, b2 1.4, s1 0.9, "
        "s2 0.2) on the model."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The edited clip's latent; decode it with VAE Decode.",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.x/SD2.x model WITHOUT the STEM patch (editing uses extended attention). FreeU, LoRA and other patches are fine."}),
                "inversion": ("STEM_INVERSION", {"tooltip": "From STEM Invert or Load STEM Inversion."}),
                "positive": ("CONDITIONING", {"tooltip": "The target prompt: what the clip should show."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt (reference: 'ugly, blurry, low res, unrealistic, unaesthetic')."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (7.5 in the reference)."}),
                "pnp_attn_t": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                         "tooltip": "Fraction of the steps (from the start) that inject the source's attention queries/keys. Higher keeps more of the source's structure."}),
                "pnp_f_t": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "Fraction of the steps that inject the source's ResNet features."}),
                "batch_size": ("INT", {"default": 8, "min": 1, "max": 256,
                                       "tooltip": "Frames per batch; one keyframe is drawn per batch each step (8 in the reference)."}),
                "seed": ("INT", {"default": 1, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seeds the keyframe draws; the same seed gives the same edit."}),
            },
            "optional": {
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                                  "tooltip": "Editing steps; 0 uses the inversion's. Others must be a subset of its timesteps."}),
                "source_conditioning": ("CONDITIONING", {"tooltip": "Overrides the source prompt stored with the inversion."}),
                "source_latent": ("LATENT", {"tooltip": "Optional check: refuse if the inversion was not made from this latent."}),
                "keyframe_positions": (["reference (batch middle)", "true keyframe positions"], {
                    "default": "reference (batch middle)",
                    "tooltip": "How propagation weighs two keyframes: the reference measures distances to each batch's middle; the option uses the sampled keyframes."}),
            },
        }

    def edit(self, model, inversion, positive, negative, cfg, pnp_attn_t, pnp_f_t, batch_size, seed,
             steps=0, source_conditioning=None, source_latent=None, keyframe_positions="reference (batch middle)"):
        if source_latent is not None:
            inversion.check_matches(latent_frames(source_latent, "source_latent"))
        out, _ = tokenflow_edit(model, inversion, positive, negative, cfg, pnp_attn_t, pnp_f_t, batch_size, seed,
                                steps or None, source_conditioning, keyframe_positions.startswith("true"))
        return ({"samples": out},)


NODE_CLASS_MAPPINGS = {"TokenFlowEdit": TokenFlowEdit}
NODE_DISPLAY_NAME_MAPPINGS = {"TokenFlowEdit": "TokenFlow Edit"}
