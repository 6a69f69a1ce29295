"""FateZero Edit's maths against FateZero's official code, function by function on tensors.

Imports the official code from a checkout you give (never vendored) and runs its functions beside
the pack's on the same inputs: word positions, the word-swap and refinement mappers, the
reweighting equaliser, the cross-replace windows, the cross- and self-attention replacement of its
edit controllers (their ``forward``), the blend mask (``SpatialBlender``), the latent blend, and
sparse-causal attention. The prompts' tokens come from ComfyUI's own tokenizer, as the node gets
them, and are first checked to equal what FateZero's tokenizer gives.

    COMFYUI_PATH=~/ComfyUI ~/ComfyUI/venv/bin/python -m benchmarks.parity_fatezero --fatezero PATH

What cannot run with today's libraries is reported, not hidden: FateZero's UNet and pipelines
(``video_diffusion/models``, ``pipelines``) import ``diffusers.modeling_utils`` and
``diffusers.models.attention.CrossAttention``, which diffusers removed after 0.11; so its
SparseCausalAttention's ``forward`` is run on a stand-in of that base class (the standard head
reshape and softmax attention), and the end-to-end comparison on one UNet is not possible here.
Stand-ins: ``omegaconf`` (a type check only) and ``video_diffusion.common.image_util`` (saves GIFs).
"""
from __future__ import annotations

import argparse
import ast
import sys
import types
from pathlib import Path

import torch

from testbed import comfyui

REPO = Path(__file__).resolve().parents[1]
PAIRS = [  # (source, target, controller): FateZero's kinds of edit
    ("a silver jeep driving down a curvy road in the countryside",
     "watercolor painting of a silver jeep driving down a curvy road in the countryside", "refine"),
    ("a man is playing tennis", "a man is playing tennis, watercolor painting", "refine"),
    ("a black swan with a red beak swimming in a river", "a white duck with a yellow beak swimming in a river", "replace"),
    ("a cat is sitting on the grass", "a spiderman is sitting on the grass", "replace"),
    ("a brown bear walking on the rock", "a red tiger walking on the rock", "replace"),
]
ROWS: list[tuple[str, str, str]] = []


def report(what: str, diff: float, note: str = "") -> None:
    ROWS.append((what, f"{diff:.3g}", note))
    print(f"| {what} | {diff:.3g} | {note} |", flush=True)


def stubs() -> None:
    om = types.ModuleType("omegaconf")
    om.dictconfig = types.SimpleNamespace(DictConfig=type("DictConfig", (dict,), {}))
    sys.modules.setdefault("omegaconf", om)
    iu = types.ModuleType("video_diffusion.common.image_util")
    iu.save_gif_mp4_folder_type = lambda *a, **k: None
    sys.modules["video_diffusion.common.image_util"] = iu


def sparse_causal_forward(fatezero: Path):
    """FateZero's SparseCausalAttention.forward, its own source, on a stand-in of diffusers 0.11's
    CrossAttention (identity projections, the standard head reshape and softmax attention)."""
    src = (fatezero / "video_diffusion" / "models" / "attention.py").read_text()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "SparseCausalAttention")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    namespace = {"rearrange": __import__("einops").rearrange, "torch": torch}
    exec(compile(ast.Module([fn], []), "SparseCausalAttention.forward", "exec"), namespace)

    class CrossAttentionStandIn:
        def __init__(self, heads, dim):
            self.heads, self.scale = heads, (dim // heads) ** -0.5
            self.added_kv_proj_dim = self.group_norm = self._slice_size = None
            self._use_memory_efficient_attention_xformers = False
            self.to_q = self.to_k = self.to_v = torch.nn.Identity()
            self.to_out = [torch.nn.Identity(), torch.nn.Identity()]

        def reshape_heads_to_batch_dim(self, t):
            b, n, d = t.shape
            return t.reshape(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

        def _attention(self, q, k, v, attention_mask=None):
            p = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
            h = p @ v
            bh, n, d = h.shape
            return h.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3).reshape(bh // self.heads, n, -1)

        forward = namespace["forward"]

    return CrossAttentionStandIn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fatezero", required=True, type=Path, help="a checkout of FateZero's official code")
    args = ap.parse_args()
    sys.path.insert(0, str(args.fatezero))
    stubs()
    import video_diffusion.prompt_attention.attention_util as au
    import video_diffusion.prompt_attention.ptp_utils as ptp
    import video_diffusion.prompt_attention.seq_aligner as sa
    from video_diffusion.prompt_attention.spatial_blend import SpatialBlender

    pack, model, clip, vae = comfyui.session(REPO, "stem-fz-parity-")
    fz = comfyui.pack_submodule(pack, "stem.fatezero")
    att = comfyui.pack_submodule(pack, "stem.attention")
    pt = comfyui.pack_submodule(pack, "nodes.host.prompt_tokens")
    tokenizer = pt._tokenizer(clip)[1].tokenizer  # the HF CLIP tokenizer ComfyUI ships (SD1)

    print("| FateZero's function against the pack's | max abs difference | |\n|---|---:|---|")
    S = 50
    for source_text, target_text, kind in PAIRS:
        source, target = pt.encode(clip, source_text, "source")[0], pt.encode(clip, target_text, "target")[0]
        tag = f"'{target_text[:24]}...'"
        assert list(source.ids) == tokenizer.encode(source_text) and list(target.ids) == tokenizer.encode(target_text), \
            "ComfyUI's tokens differ from FateZero's tokenizer.encode"
        for prompt in (source, target):
            for w, word in enumerate(prompt.words):
                assert list(ptp.get_word_inds(prompt.text, w, tokenizer)) == prompt.positions(w), (prompt.text, word)
                assert list(ptp.get_word_inds(prompt.text, word, tokenizer)) == prompt.positions(word)
        prompts = [source_text, target_text]
        if kind == "replace":
            theirs = sa.get_replacement_mapper(prompts, tokenizer)[0]
            report(f"get_replacement_mapper {tag}", (theirs - fz.replacement_mapper(source, target)).abs().max().item())
        mapper, alphas = sa.get_refinement_mapper(prompts, tokenizer)
        ours_m, ours_a = fz.refinement_mapper(source, target)
        report(f"get_refinement_mapper {tag}", max((mapper[0] - ours_m).abs().max().item(),
                                                   (alphas[0] - ours_a).abs().max().item()))
        word = target.words[-1]
        eq = au.get_equalizer(target_text, (word,), (10.0,), tokenizer)[0]
        report(f"get_equalizer '{word}'", (eq - fz.equalizer(target, [word], [10.0])).abs().max().item())
        for bounds in (0.8, (0.2, 0.6)):
            theirs = ptp.get_time_words_attention_alpha(prompts, S, bounds, tokenizer)[:, 0, 0, 0]
            report(f"get_time_words_attention_alpha {bounds}", (theirs - fz.cross_replace_alpha(S, bounds)).abs().max().item())

        # the edit controllers' forward on the cross- and self-attention of one stored step
        F, heads, r = 2, 8, 16
        g = torch.Generator().manual_seed(1)
        maps = {k: [] for k in ("down_cross", "mid_cross", "up_cross", "down_self", "mid_self", "up_self")}
        for key, n in (("down_cross", 4), ("up_cross", 3)):
            maps[key] = [torch.softmax(4 * torch.randn(F, heads, r * r, 77, generator=g), -1) for _ in range(n)]
        store = types.SimpleNamespace(attention_store_all_step=[maps], latents_store=[])
        eq_params = {"words": [word], "values": [10.0]}
        src_words, tgt_words = source.words[1], target.words[1]
        for th in (0.3, 2.0):
            ctl = au.make_controller(tokenizer, prompts, kind == "replace", {"default_": 0.8}, 0.7,
                                     blend_words=[[src_words], [tgt_words]], equilizer_params=eq_params,
                                     additional_attention_store=store, use_inversion_attention=True, blend_th=(th, th),
                                     NUM_DDIM_STEPS=10, blend_self_attention=True, save_path="/tmp/fz-parity")
            ctl.attention_blend.save_path = None
            p_own = torch.softmax(torch.randn(F * heads, r * r, 77, generator=g), -1)
            got = ctl.forward(p_own.view(F, heads, r * r, 77).clone(), True, "down")  # stored down_cross[0]
            control = fz.CrossControl.between(source, target, kind, fz.equalizer(target, [word], [10.0]))
            ours = control(maps["down_cross"][0], p_own.view(F, heads, r * r, 77), fz.cross_replace_alpha(10, 0.8)[0])
            report(f"{kind} + reweight, cross forward", (got - ours).abs().max().item())
            # self-attention in the window, blended by the source words' mask of the stored step
            self_src = torch.softmax(torch.randn(F, heads, r * r, r * r, generator=g), -1)
            maps["down_self"] = [self_src]
            ctl.attention_position_counter_dict["down_self"] = 0
            own_self = torch.softmax(torch.randn(F, heads, r * r, r * r, generator=g), -1)
            got = ctl.forward(own_self.clone(), False, "down")
            words = torch.zeros(77)
            words[source.positions(src_words)] = 1
            total = sum(fz.word_map(m, words) for m in maps["down_cross"][2:4] + maps["up_cross"][:3]).view(F, r, r)
            mask = fz.blend_mask(total, 5 * heads, (r, r), th)
            assert th >= 1 or 0 < mask.mean() < 1, "the mask should have both values"
            ours = fz.fuse(own_self.permute(0, 2, 1, 3).reshape(F, r * r, -1), self_src.permute(0, 2, 1, 3).reshape(F, r * r, -1),
                           mask).view(F, r * r, heads, -1).permute(0, 2, 1, 3)
            report(f"SpatialBlender mask + replace_self_attention, th {th}", (got - ours).abs().max().item())

        # latent blend: both prompts' masks, OR, at the latent's size
        blender = SpatialBlender(prompts, [[src_words], [tgt_words]], start_blend=0.0, end_blend=2.0, tokenizer=tokenizer,
                                 th=(0.3, 0.3), NUM_DDIM_STEPS=1, prompt_choose="both")
        tgt_maps = {k: [torch.softmax(4 * torch.randn(F, heads, r * r, 77, generator=g), -1) for _ in v]
                    for k, v in maps.items() if k.endswith("cross")}
        both = {k: [torch.stack([a, b]) for a, b in zip(maps[k], tgt_maps[k])] for k in tgt_maps}
        x = torch.randn(2, 4, F, 32, 32, generator=g)
        got = blender(attention_store=both, x_t=x.clone())[1]
        masks = []
        for stored, prompt, w in ((maps, source, src_words), (tgt_maps, target, tgt_words)):
            words = torch.zeros(77)
            words[prompt.positions(w)] = 1
            total = sum(fz.word_map(m, words) for m in stored["down_cross"][2:4] + stored["up_cross"][:3]).view(F, r, r)
            masks.append(fz.blend_mask(total, 5 * heads, (32, 32), 0.3))
        mask = (sum(masks) > 0).float().view(F, 1, 32, 32)
        assert 0 < mask.mean() < 1, "the latent mask should have both values"
        ours = fz.blend_latents(x[0].transpose(0, 1), x[1].transpose(0, 1), mask).transpose(0, 1)
        report("SpatialBlender latent blend (both prompts)", (got - ours).abs().max().item())

    Standin = sparse_causal_forward(args.fatezero)
    g = torch.Generator().manual_seed(2)
    for F in (1, 2, 5):
        h = torch.randn(F, 16, 32, generator=g)
        got = Standin(4, 32).forward(h, clip_length=F)
        report(f"SparseCausalAttention [-1, 'first'], {F} frames",
               (got - att.sparse_causal_attention(h, h, h, 4)).abs().max().item(), "forward on a stand-in base")
    try:
        import video_diffusion.models.unet_3d_condition  # noqa: F401
        print("\nFateZero's UNet imports with this diffusers")
    except Exception as e:  # what stops the end-to-end comparison, said as it is
        print(f"\nFateZero's UNet does not import with diffusers {__import__('diffusers').__version__}: "
              f"{type(e).__name__}: {e}")
    worst = max(float(d) for _, d, _ in ROWS)
    print(f"\n{len(ROWS)} comparisons, largest difference {worst:.3g}")


if __name__ == "__main__":
    main()
