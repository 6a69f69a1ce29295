"""Save STEM Inversion and Load STEM Inversion: an inversion as a safetensors file.

An inversion takes minutes to compute and is reused for many edits of the same clip; the file
format (tensors and JSON metadata, never a pickle) is stem.inversion's, the folders and names
``host/inversion_files.py``'s.
"""
from __future__ import annotations

import logging
import os

import torch

from ..stem.inversion import Inversion, InversionError, load_inversion, save_inversion
from .host.inversion_files import inversion_path, list_inversions, next_free_path, save_target
from .host.pack import CATEGORY, StemError
from .host.paths import file_signature, linked

log = logging.getLogger("ComfyUI-STEM")

DTYPES = {"float32": torch.float32, "float16": torch.float16}


class SaveSTEMInversion:
    DESCRIPTION = (
        "Saves an inversion (the latent trajectory, the schedule, the source prompt and the settings) as a "
        "safetensors file in ComfyUI's output folder, to edit the same clip again later without inverting it "
        "anew. Load it with Load STEM Inversion (press R to refresh its list)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion": ("STEM_INVERSION", {"tooltip": "From STEM Invert."}),
                "filename_prefix": ("STRING", {
                    "default": "stem_inversion/clip",
                    "tooltip": "Path inside ComfyUI's output folder; '_00001.safetensors' (the next free number) is "
                               "appended. Folders in it are created; it may not point outside the output folder. "
                               "%year%, %month%, %day%, %hour%, %minute%, %second% are replaced as in Save Image.",
                }),
            },
            "optional": {
                "dtype": (list(DTYPES), {
                    "default": "float32",
                    "tooltip": "Precision of the stored latents. float16 halves the file; the latents then differ by "
                               "about 1e-3 relative, which shifts an edit slightly. The prompt conditioning and the "
                               "schedule are always stored exactly.",
                }),
            },
        }

    def save(self, inversion, filename_prefix, dtype="float32"):
        import folder_paths

        if not isinstance(inversion, Inversion):
            raise StemError(f"inversion: expected a STEM inversion from STEM Invert, got {type(inversion).__name__}")
        if dtype not in DTYPES:
            raise StemError(f"dtype: must be one of {list(DTYPES)}, got {dtype!r}")
        if dtype == "float16" and not bool(inversion.latents.abs().max() <= torch.finfo(torch.float16).max):
            raise StemError("dtype: the latents hold values float16 cannot store; save as float32")
        output_dir = folder_paths.get_output_directory()
        path = next_free_path(*save_target((filename_prefix or "").strip(), output_dir))
        save_inversion(inversion, path, dtype=DTYPES[dtype])
        rel = os.path.relpath(path, output_dir).replace(os.sep, "/")
        log.info("STEM: saved the inversion (%d frames, %d steps) to %s", inversion.num_frames, inversion.steps, path)
        return {"ui": {"text": [f"{rel} [output]"]}}


class LoadSTEMInversion:
    DESCRIPTION = (
        "Loads an inversion saved by Save STEM Inversion, from ComfyUI's input or output folder, for TokenFlow "
        "Edit or STEM Reconstruct; the nodes that use it check that it fits their model and latent. Only "
        "safetensors files are read (nothing is unpickled)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STEM_INVERSION",)
    RETURN_NAMES = ("inversion",)
    OUTPUT_TOOLTIPS = ("The saved trajectory, schedule, source prompt and settings.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion_file": (list_inversions(), {
                    "tooltip": "A STEM inversion (.safetensors written by Save STEM Inversion) in ComfyUI's input "
                               "folder, or in the output folder (marked [output]). Press R to refresh the list "
                               "after saving one. Files outside those folders are refused.",
                }),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, inversion_file=None, input_types=None):
        # Taking the input here makes ComfyUI skip its "value in list" check; this replaces it.
        # `input_types` names the linked inputs: a linked name is checked when the node runs.
        if linked("inversion_file", input_types):
            return True
        if inversion_file is None or inversion_file == "":  # the list was empty when the graph was made
            return ("inversion_file: no inversion chosen (the list is empty). Save one with Save STEM Inversion "
                    "(it goes to the output folder), press R to refresh the list, and pick it.")
        try:
            inversion_path(inversion_file, check_format=True)
        except (StemError, InversionError) as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, inversion_file=None):
        try:
            return file_signature(inversion_path(inversion_file, check_format=False))
        except (StemError, OSError):
            return float("nan")  # never equal to itself: run again, and let `load` report it

    def load(self, inversion_file):
        path = inversion_path(inversion_file, check_format=False)
        try:
            inv = load_inversion(path)
        except InversionError as e:
            raise InversionError(f"inversion_file: {e}") from None
        except Exception as e:  # a readable header over damaged tensors: safetensors' own error type
            raise InversionError(f"inversion_file: '{path}' could not be read ({e}); the file is damaged, save it again") from None
        log.info("STEM: loaded an inversion of %d frames, %d steps (%s) from %s",
                 inv.num_frames, inv.steps, inv.settings.get("attention", "?"), path)
        return (inv,)


NODE_CLASS_MAPPINGS = {"STEMSaveInversion": SaveSTEMInversion, "STEMLoadInversion": LoadSTEMInversion}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMSaveInversion": "Save STEM Inversion", "STEMLoadInversion": "Load STEM Inversion"}
