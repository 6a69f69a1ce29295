"""Load Video Frames: a clip from ComfyUI's input folder as IMAGE frames, decoded by stem.video."""
from __future__ import annotations

from ..stem.video import IMAGE_EXTENSIONS, FrameSelection, VideoError, load_video, probe_video
from .host.clips import FRAME_ORDER, MAX_SIZE, MIN_SIZE, check_memory, list_clips, size_problem
from .host.pack import CATEGORY, StemError
from .host.paths import existing_in_folders, file_signature, linked



class LoadVideoFrames:
    DESCRIPTION = (
        "Loads a video (mp4, webm, mov, avi, mkv, gif) or a folder of images from ComfyUI's input folder "
        "as IMAGE frames, resized so that width and height are multiples of 8 (what the VAE needs). "
        f"Frames are chosen in this order: {FRAME_ORDER}. Refuses, before decoding, a selection that "
        "would not fit in memory."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT", "INT", "INT")
    RETURN_NAMES = ("frames", "frame_count", "fps", "width", "height")
    OUTPUT_TOOLTIPS = (
        "The selected frames, RGB in [0, 1], [frames, height, width, 3].",
        "How many frames were loaded.",
        "Frame rate of the loaded frames: the source's fps divided by select_every_nth (8 for a folder of "
        "images); use it to save the edited clip at the source's speed.",
        "Width of the frames in pixels (a multiple of 8).",
        "Height of the frames in pixels (a multiple of 8).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {
            "required": {
                "video": (list_clips(folder_paths.get_input_directory()), {
                    "video_upload": True,
                    "tooltip": "A video in ComfyUI's input folder (upload one with the button), or a sub-folder of "
                               "it holding frames as images (natural order: frame2 before frame10). Files outside "
                               "the input folder are refused.",
                }),
                "frame_load_cap": ("INT", {
                    "default": 0, "min": 0, "max": 1_000_000, "step": 1,
                    "tooltip": "Stop after this many frames (0 = all). Applied last: skip_first_frames, then "
                               "select_every_nth, then frame_load_cap.",
                }),
                "skip_first_frames": ("INT", {
                    "default": 0, "min": 0, "max": 1_000_000, "step": 1,
                    "tooltip": "Drop this many frames from the start. Applied first: skip_first_frames, then "
                               "select_every_nth, then frame_load_cap.",
                }),
                "select_every_nth": ("INT", {
                    "default": 1, "min": 1, "max": 1000, "step": 1,
                    "tooltip": "Of the frames left after skipping, keep the first and then every nth (1 = all; 2 "
                               "halves the frame rate). Order: skip_first_frames, then select_every_nth, then "
                               "frame_load_cap.",
                }),
                "size": ("INT", {
                    "default": 512, "min": 0, "max": MAX_SIZE, "step": 8,
                    "tooltip": f"Target length of the SHORT side in pixels (rounded down to a multiple of 8; at "
                               f"least {MIN_SIZE}, which SD needs); the long side follows the aspect ratio. 0 keeps "
                               "the source size (rounded down to multiples of 8).",
                }),
                "crop": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: keep the whole frame, scaled (at most 4 px of squeeze on the long side from "
                               "rounding to 8). On: cut instead of squeezing: with size > 0 a square size x size "
                               "centre crop (the reference's 512x512); with size 0 a centre crop to multiples of 8, "
                               "no scaling.",
                }),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video=None, size=None, input_types=None):
        # Taking `video` here makes ComfyUI skip its "value in list" check for it, so that
        # files uploaded into sub-folders load; the location check below replaces it.
        # `input_types` names the linked inputs: those are checked when the node runs.
        # (a widget's INT is never None here: ComfyUI converts it first and refuses a null)
        problem = None if size is None or linked("size", input_types) else size_problem(size)
        if problem:
            return problem
        if linked("video", input_types):
            return True
        try:
            existing_in_folders(video, "video")
        except StemError as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, video=None, **options):
        try:
            signature = file_signature(existing_in_folders(video, "video"), IMAGE_EXTENSIONS)
        except (StemError, OSError):
            return float("nan")  # never equal to itself: run again, and let `load` report it
        return f"{signature}:{sorted(options.items())!r}"

    def load(self, video, frame_load_cap, skip_first_frames, select_every_nth, size, crop):
        path = existing_in_folders(video, "video")
        if size_problem(size):
            raise StemError(size_problem(size))
        selection = FrameSelection(frame_load_cap=frame_load_cap, skip_first_frames=skip_first_frames,
                                   select_every_nth=select_every_nth, size=size, crop=crop)
        try:
            planned = probe_video(path, selection)
            check_memory(planned.frame_count, planned.width, planned.height)
            frames, info = load_video(path, selection)
        except VideoError as e:
            raise VideoError(f"video: {e}") from None
        return (frames, info.frame_count, float(info.loaded_fps), info.width, info.height)


NODE_CLASS_MAPPINGS = {"STEMLoadVideoFrames": LoadVideoFrames}
NODE_DISPLAY_NAME_MAPPINGS = {"STEMLoadVideoFrames": "Load Video Frames"}
