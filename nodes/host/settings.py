"""The STEM Attention Patch's settings: one typed, frozen object that rides on the patched MODEL.

STEM Attention Patch puts an :class:`AttentionSettings` into the clone's
``transformer_options`` under :data:`SETTINGS_KEY`; everything downstream reads it back through
:meth:`AttentionSettings.of` (a MODEL) or :meth:`AttentionSettings.from_options` (a UNet call's
options). A node that plans a run stores the plan as a copy with the resolved pass size
(:meth:`AttentionSettings.with_pass_size`), so ``frames_per_pass`` answers "how many frames a
pass" everywhere. An inversion records :meth:`AttentionSettings.asdict`, the flat JSON its files
have always held, and :meth:`AttentionSettings.from_record` reads it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ...stem.em import EMParams
from ...stem.memory import PROFILES, SD1, Profile
from .cancel import interrupted
from .layer import layer_seed
from .pack import StemError

SETTINGS_KEY = "stem_attention"  # transformer_options entry of a patched MODEL
MODES = ("stem", "inflated", "per-frame", "sparse-causal")
GROUPINGS = ("whole clip", "chunks of n frames")
WHOLE_CLIP, CHUNKS = GROUPINGS


@dataclass(frozen=True)
class AttentionSettings:
    """How every self-attention of a patched UNet attends, and how its calls are cut into passes."""

    mode: str = "stem"  # one of MODES
    em: EMParams = field(default_factory=EMParams)  # STEM's EM (no generator: each layer seeds its own)
    seed: int = 1  # the run seed the layers' EM seeds derive from
    grouping: str = WHOLE_CLIP  # one of GROUPINGS
    frames_per_group: int = 8  # n of "chunks of n frames"
    frames_per_pass: int = 0  # frames a UNet pass computes; 0 = the most that fit, per call
    profile: Profile = SD1  # the UNet family's activation model, for the memory plans

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise StemError(f"attention: '{self.mode}' is not one of {list(MODES)}")
        if self.grouping not in GROUPINGS:
            raise StemError(f"grouping: '{self.grouping}' is not one of {list(GROUPINGS)}")

    @property
    def group_size(self) -> int | None:
        """Frames a group of shared attention (None: every frame of the clip)."""
        return self.frames_per_group if self.grouping == CHUNKS else None

    @property
    def gathers_clip(self) -> bool:
        """Inflated attention over the whole clip: passes gather every frame's keys and values."""
        return self.mode == "inflated" and self.group_size is None

    def layer_em(self, extra_options: dict) -> EMParams:
        """The EM parameters of one layer call, its generator seeded by the run seed, the layer and
        the noise level (``layer.layer_seed``), checking for Cancel between its token chunks."""
        return replace(self.em.seeded(layer_seed(self.seed, extra_options)), interrupt=interrupted)

    def with_pass_size(self, frames_per_pass: int) -> "AttentionSettings":
        """These settings with a run's resolved pass size."""
        return replace(self, frames_per_pass=int(frames_per_pass))

    @staticmethod
    def from_options(transformer_options: dict) -> "AttentionSettings | None":
        """The settings a UNet call carries; None where no STEM Attention Patch is on the model."""
        return transformer_options.get(SETTINGS_KEY)

    @staticmethod
    def of(model) -> "AttentionSettings | None":
        """The settings on a MODEL; None where no STEM Attention Patch is on it."""
        return AttentionSettings.from_options(model.model_options.get("transformer_options", {}))

    def on(self, model):
        """A clone of ``model`` that carries these settings (the MODEL given is left as it is)."""
        m = model.clone()
        m.model_options["transformer_options"][SETTINGS_KEY] = self
        return m

    def asdict(self) -> dict[str, Any]:
        """The flat record an inversion keeps of the attention it was made with (JSON)."""
        return {"attention": self.mode, "num_bases": self.em.num_bases, "em_iters": self.em.iters,
                "tau": self.em.tau, "seed": self.seed, "grouping": self.grouping,
                "frames_per_group": self.frames_per_group, "frames_per_pass": self.frames_per_pass,
                "memory_profile": self.profile.name}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "AttentionSettings | None":
        """The settings an inversion's record describes (:meth:`asdict`); None for a model that had
        no patch. Fields a record lacks take their defaults."""
        if "num_bases" not in record:
            return None
        defaults = cls()
        em = EMParams(int(record["num_bases"]), int(record.get("em_iters", defaults.em.iters)),
                      float(record.get("tau", defaults.em.tau)))
        return cls(mode=record.get("attention", defaults.mode), em=em, seed=int(record.get("seed", defaults.seed)),
                   grouping=record.get("grouping", defaults.grouping),
                   frames_per_group=int(record.get("frames_per_group", defaults.frames_per_group)),
                   frames_per_pass=int(record.get("frames_per_pass", defaults.frames_per_pass)),
                   profile=PROFILES.get(record.get("memory_profile"), defaults.profile))

    def describe(self) -> str:
        if self.mode == "per-frame":
            return "per-frame attention"
        group = "the whole clip" if self.group_size is None else f"chunks of {self.group_size} frames"
        if self.mode == "inflated":
            return f"inflated attention over {group}"
        if self.mode == "sparse-causal":
            return "sparse-causal attention (each frame to the previous and the first frame)"
        return f"STEM attention ({self.em.num_bases} bases, {self.em.iters} EM iterations, seed {self.seed}) over {group}"


def describe(settings: AttentionSettings | None) -> str:
    """The attention of a MODEL in words (None: an unpatched model)."""
    return "per-frame attention" if settings is None else settings.describe()


def same_attention(a: AttentionSettings | None, b: AttentionSettings | None) -> bool:
    """Whether two MODELs' settings (None: unpatched) compute the same attention: the pass size
    and the memory profile change how a call runs, not what it computes."""
    return _what_it_computes(a) == _what_it_computes(b)


def _what_it_computes(settings: AttentionSettings | None) -> tuple:
    if settings is None or settings.mode == "per-frame":
        return ("per-frame",)
    if settings.mode in ("inflated", "sparse-causal"):
        return (settings.mode, settings.group_size if settings.mode == "inflated" else None)
    return ("stem", settings.em, settings.seed, settings.group_size)
