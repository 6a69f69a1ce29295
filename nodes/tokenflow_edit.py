"""TokenFlow Edit: keyframes edited jointly with PnP injection, then propagated (REFERENCE §5).

Design note: like the reference, each pass (keyframes, then each propagation batch) is one
three-branch UNet call. The branches go through ComfyUI's own ``calc_cond_batch`` as three
conds (target, negative, source), so FreeU, LoRA and ControlNet keep working; the source
branch has its own latent (the inversion's), which an APPLY_MODEL wrapper swaps into the
source rows. Where ComfyUI cannot batch the conds together (memory, a ControlNet on only
some conds) and runs an edit branch before the source, the pass is redone as two calls,
source first, for the rest of the run: slower, still exact. A ControlNet or T2I-Adapter hint
with one image per frame is cut to each pass's frames (:func:`frame_hints`).
"""
from __future__ import annotations

import contextlib
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
WRAPPER_KEY = "comfyui-stem.tokenflow"

# positions of the conds in each calc_cond_batch call; the source goes last so that ComfyUI,
# when it must split the batch, runs it first
POSITIVE, NEGATIVE, SOURCE = 0, 1, 2
SOURCE_COND = "stem_source"  # the guider's name for the source prompt's conds


class SourceMissing(RuntimeError):
    """An edit branch ran before the source branch of the same pass."""


class EditState:
    """Per-run state the patches read and write. Never deep-copied: ``clone()`` copies the
    model options that refer to it, and the recorded tensors must stay shared."""

    def __init__(self, batch_size: int, pnp_attn_steps: int, pnp_f_steps: int, use_true_positions: bool):
        self.batch_size = batch_size
        self.pnp_attn_steps = pnp_attn_steps
        self.pnp_f_steps = pnp_f_steps
        self.use_true_positions = use_true_positions
        self.step = 0
        self.mode = "off"  # "kf" (keyframe pass) or "prop" (propagation pass)
        self.batch = 0
        self.layout: list = []  # cond_or_uncond of the UNet call in progress
        self.source_input: torch.Tensor | None = None  # the source latent of the current frames
        self.split_calls = False
        self.keyframes: torch.Tensor | None = None
        self.num_frames = 0  # frames in the clip being edited
        self.calls: dict = {}  # (step, mode, hook, block key) -> count, for tests and debugging
        self.reset()

    def reset(self) -> None:
        self.kf_norm: dict = {}  # block key -> source norm1(x) of the keyframes [K, N, C]
        self.kf_qk: dict = {}  # block key -> (q, k) of the source keyframes
        self.kf_out: dict = {}  # block key -> {cond index: self-attention output [K, N, C]}
        self.nn: dict = {}  # block key -> (idx_b, idx_prev, weights) of the current batch
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


def _chunks(x: torch.Tensor, layout: list) -> list[tuple[int, torch.Tensor]]:
    return list(zip(layout, x.chunk(len(layout))))


def _need(record: dict, key, what: str):
    if key not in record:
        raise SourceMissing(what)
    return record[key]


def make_patches(state: EditState):
    """attn1 patch (norm1 input), attn1 replacement (q, k, v) and attn1 output patch. Each
    works chunk by chunk, the chunk's branch read from ``cond_or_uncond``."""
    from comfy.ldm.modules.attention import optimized_attention

    def norm_patch(n, context, value, extra_options):
        refuse_split_frames(extra_options)
        key = _key(extra_options)
        state.count("norm", key)
        for c, part in _chunks(n, extra_options.get("cond_or_uncond") or [POSITIVE]):
            if c != SOURCE:
                continue
            if state.mode == "kf":
                state.kf_norm[key] = part
            elif state.mode == "prop":
                # REFERENCE §5.4: nearest neighbours by cosine of the SOURCE norm1(x), one field per keyframe
                b = state.batch
                idx_b = nearest_neighbour_field(part, state.kf_norm[key][b])
                if b > 0:
                    idx_prev = nearest_neighbour_field(part, state.kf_norm[key][b - 1])
                    frames = b * state.batch_size + torch.arange(part.shape[0], device=part.device)
                    w = propagation_weights(frames, b, state.batch_size, state.keyframes, state.use_true_positions)
                    state.nn[key] = (idx_b, idx_prev, w)
                else:
                    state.nn[key] = (idx_b, None, None)
        return n, context, value

    def attn_replace(q, k, v, extra_options):
        key = _key(extra_options)
        state.count("attn", key)
        heads = extra_options["n_heads"]
        if state.mode == "prop":
            return torch.zeros_like(q)  # no self-attention: the output patch supplies it
        if state.mode != "kf":
            return optimized_attention(q, k, v, heads)
        layout = extra_options.get("cond_or_uncond") or [POSITIVE]
        pnp_block = key[0] == "output" and key[1] in PNP_ATTN_OUTPUT_BLOCKS and state.attn_injection
        qs, ks, vs = (dict(_chunks(x, layout)) for x in (q, k, v))
        if SOURCE in qs and pnp_block:
            state.kf_qk[key] = (qs[SOURCE], ks[SOURCE])
        out = []
        for c in layout:
            if c == SOURCE:  # the source keeps per-frame attention
                out.append(optimized_attention(qs[c], ks[c], vs[c], heads))
                continue
            qc, kc = qs[c], ks[c]
            if pnp_block:
                state.count("pnp_qk", key)
                sq, sk = _need(state.kf_qk, key, "source q/k")
                qc, kc = pnp_substitute(qc, sq, [True]), pnp_substitute(kc, sk, [True])
            # extended attention: every keyframe attends to all keyframes of its branch
            out.append(full_attention(qc, kc, vs[c], heads))
        return torch.cat(out)

    def output_patch(n, extra_options):
        key = _key(extra_options)
        state.count("out", key)
        layout = extra_options.get("cond_or_uncond") or [POSITIVE]
        if state.mode == "kf":
            for c, part in _chunks(n, layout):
                state.kf_out.setdefault(key, {})[c] = part
            return n
        idx_b, idx_prev, w = _need(state.nn, key, "source nearest neighbours")
        b = state.batch
        outs = []
        for c in layout:
            kf = state.kf_out[key][c]  # [K, N, C]; the same fields serve every branch (REFERENCE §5.4)
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
        if st.mode not in ("kf", "prop"):
            return h
        st.count("features", PNP_FEATURE_MODULE)
        parts = dict(_chunks(h, st.layout))
        if SOURCE in parts:
            st.features = parts[SOURCE]
        if not st.feature_injection or list(parts) == [SOURCE]:
            return h
        st.count("pnp_features", PNP_FEATURE_MODULE)
        if st.features is None:
            raise SourceMissing("source features")
        src = st.features.to(h.dtype)
        return torch.cat([part if c == SOURCE else src for c, part in parts.items()])


def make_source_swap(state: EditState):
    """APPLY_MODEL wrapper: the source rows of the batch get the inversion's latent."""

    def source_swap(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        layout = list(transformer_options.get("cond_or_uncond") or [POSITIVE])
        state.layout = layout
        if SOURCE in layout and state.source_input is not None:
            F = x.shape[0] // len(layout)
            i = layout.index(SOURCE)
            x = torch.cat([x[: i * F], state.source_input.to(x), x[(i + 1) * F :]])
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return source_swap


def build_edit_model(model, state: EditState):
    import comfy.patcher_extension

    m = model.clone()
    norm_patch, attn_replace, output_patch = make_patches(state)
    m.set_model_attn1_patch(norm_patch)
    for block, idx, tidx in attn1_sites(m):
        m.set_model_attn1_replace(attn_replace, block, idx, tidx)
    m.set_model_attn1_output_patch(output_patch)
    m.add_object_patch(PNP_FEATURE_MODULE, FeatureInjection(m.get_model_object(PNP_FEATURE_MODULE), state))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, make_source_swap(state))
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


def _controls(conds: dict):
    """Every ControlNet / T2I-Adapter object in the guider's conds, chains included, once each."""
    seen = {}
    for cond_list in conds.values():
        for c in cond_list or ():
            control = c.get("control") if isinstance(c, dict) else None
            while control is not None and id(control) not in seen:
                seen[id(control)] = control
                control = getattr(control, "previous_controlnet", None)
    return list(seen.values())


@contextlib.contextmanager
def frame_hints(conds: dict, frames, num_frames: int):
    """Give a pass over some of the clip's frames those frames' control hints.

    ComfyUI fits a hint batch to a UNet call by taking its first rows, which is right when a
    sampler sees every frame at once. TokenFlow's passes see a subset (the keyframes, then each
    batch), so a hint with one image per frame is cut to ``frames`` for the pass and put back
    afterwards (the control objects belong to the conditioning, which ComfyUI caches). A single
    hint image, or a hint batch of another length, is left to ComfyUI.
    """
    saved = []
    if num_frames > 1:
        for control in _controls(conds):
            hint = getattr(control, "cond_hint_original", None)
            if isinstance(hint, torch.Tensor) and hint.shape[0] == num_frames:
                saved.append((control, hint))
                control.cond_hint_original = hint[frames]
                control.cond_hint = None  # recomputed from the frames' hints by get_control
    try:
        yield
    finally:
        for control, hint in saved:
            control.cond_hint_original = hint
            control.cond_hint = None


def tokenflow_guider(model, state: EditState, inv: Inversion, source_cond, positive, negative, cfg: float, timesteps, seed: int):
    import comfy.samplers

    generator = torch.Generator().manual_seed(int(seed))

    class TokenFlowGuider(comfy.samplers.CFGGuider):
        def run_pass(self, mode, frames, x, src, ts, model_options):
            """One pass over ``frames`` of the clip (``x``, ``src`` and ``ts`` are already cut
            to them): all three branches, in one call where ComfyUI can."""
            with frame_hints(self.conds, frames, state.num_frames):
                return self._run_pass(mode, x, src, ts, model_options)

        def _run_pass(self, mode, x, src, ts, model_options):
            state.mode = mode
            state.source_input = src
            state.nn, state.features = {}, None  # never let a branch read the previous pass's
            conds = [self.conds.get("positive"), self.conds.get("negative") if cfg != 1.0 else None, self.conds[SOURCE_COND]]
            calc = comfy.samplers.calc_cond_batch
            if not state.split_calls:
                try:
                    return calc(self.inner_model, conds, x, ts, model_options)
                except SourceMissing:
                    log.info("TokenFlow Edit: ComfyUI ran the branches separately; calling the source branch first")
                    state.split_calls = True
            calc(self.inner_model, [None, None, conds[SOURCE]], x, ts, model_options)
            state.count("split_pass", mode)
            return calc(self.inner_model, conds[:2] + [None], x, ts, model_options)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            F, bs = x.shape[0], state.batch_size
            src = self.inner_model.process_latent_in(inv.latent_at(timesteps[state.step]).to(x.device, x.dtype))
            state.reset()
            state.keyframes = sample_keyframes(F, bs, generator)
            state.num_frames = F
            kf = state.keyframes.tolist()
            self.run_pass("kf", kf, x[kf], src[kf], timestep[: len(kf)], model_options)  # output discarded (§5.3)
            denoised = torch.empty_like(x)
            for b, frames in enumerate(batch_ranges(F, bs)):
                interrupted()
                sl = slice(frames.start, frames.stop)
                state.batch = b
                cond, uncond, _ = self.run_pass("prop", sl, x[sl], src[sl], timestep[sl], model_options)
                if cfg == 1.0:
                    denoised[sl] = cond
                else:
                    denoised[sl] = comfy.samplers.cfg_function(
                        self.inner_model, cond, uncond, cfg, x[sl], timestep[sl], model_options=model_options,
                        cond=self.conds.get("positive"), uncond=self.conds.get("negative"))
            state.mode = "off"
            state.source_input = None
            state.reset()
            return denoised

    g = TokenFlowGuider(model)
    g.inner_set_conds({"positive": positive, "negative": negative, SOURCE_COND: source_cond})
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

    start = inv.latent_at(ts[0]).clone()  # the inversion's latent at the edit's first level
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
