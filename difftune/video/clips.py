"""Decode and encode short clips: a clip is a list of RGB PIL frames plus its frame rate.

Sources (`read_clip`): a video file (``.mp4``, ``.webm``, ``.mkv``, ``.mov``, ``.avi``, ``.m4v``) through
PyAV, FFmpeg's Python binding (``pip install 'difftune[video]'``; refused by name without it); an
animated WebP or GIF through Pillow; a folder of frames (sorted by name); a still image, a clip of one
frame. Outputs (`save_clip_grid`): an animated WebP (Pillow, lossless), an mp4 (H.264 through PyAV,
when installed) and a PNG frame strip (one row per clip, one column per frame).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DifftuneError
from ..io import atomic_write, save_image, save_webp

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
ANIMATED_SUFFIXES = (".webp", ".gif")  # may hold one frame (a still image) or many
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # frames of a frame folder
DEFAULT_FPS = 16.0  # Wan's frame rate: what a clip without one (a frame folder) is written at
VIDEO_EXTRA = "pip install 'difftune[video]' (PyAV)"

Clip = list[Image.Image]


@dataclasses.dataclass(frozen=True)
class ClipInfo:
    """What a clip source holds, read without keeping its frames."""

    frames: int
    width: int
    height: int
    fps: float | None  # None: the source has no frame rate (a folder of frames, a still image)


def has_video_decoder() -> bool:
    """Whether PyAV (the ``video`` extra) is installed: mp4/webm reading and mp4 writing need it."""
    return importlib.util.find_spec("av") is not None


def _require_av(path: Path):
    if not has_video_decoder():
        raise DifftuneError(f"{path}: reading {path.suffix} files needs PyAV, which is not installed: "
                            f"{VIDEO_EXTRA}; or give the clip as animated WebP/GIF or a folder of frames")
    import av

    return av


def source_kind(path: Path) -> str | None:
    """``video``, ``animated`` (WebP/GIF, maybe one frame), ``image``, ``frames`` (a folder) or None."""
    if path.is_dir():
        return "frames"
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in ANIMATED_SUFFIXES:
        return "animated"
    if suffix in FRAME_SUFFIXES:
        return "image"
    return None


def frame_files(folder: Path) -> list[Path]:
    """The frames of a frame folder, sorted by name (hidden files and captions left out)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES)


def _rgb(image: Image.Image) -> Image.Image:
    from ..training.data import to_rgb

    return to_rgb(ImageOps.exif_transpose(image))


def read_clip(path: str | Path, indices: Sequence[int] | None = None) -> tuple[Clip, float | None]:
    """The frames at ``indices`` (all without), as RGB PIL images, and the source's frame rate."""
    path = Path(path)
    kind = source_kind(path)
    wanted = None if indices is None else set(indices)
    if kind == "video":
        frames, fps = _decode_video(path, wanted)
    elif kind == "frames":
        files = frame_files(path)
        frames = [_open_frame(files[i]) for i in (range(len(files)) if indices is None else indices)]
        return frames, None
    elif kind in ("animated", "image"):
        frames, fps = _decode_pillow(path, wanted)
    else:
        raise DifftuneError(f"{path}: not a clip (videos: {', '.join(VIDEO_SUFFIXES)}; animated WebP/GIF; "
                            "a folder of frames; a still image)")
    if indices is not None:
        frames = [frames[sorted(wanted).index(i)] for i in indices]
    return frames, fps


def _open_frame(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return _rgb(image)


def _decode_video(path: Path, wanted: set[int] | None) -> tuple[Clip, float | None]:
    av = _require_av(path)
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        last = max(wanted) if wanted else None
        for index, frame in enumerate(container.decode(stream)):
            if wanted is None or index in wanted:
                frames.append(frame.to_image().convert("RGB"))
            if last is not None and index >= last:
                break
    return frames, fps


def _decode_pillow(path: Path, wanted: set[int] | None) -> tuple[Clip, float | None]:
    frames, durations = [], []
    with Image.open(path) as image:
        count = getattr(image, "n_frames", 1)
        for index in range(count):
            image.seek(index)
            image.load()  # WebP sets a frame's duration when it is decoded
            durations.append(image.info.get("duration") or 0)
            if wanted is None or index in wanted:
                frames.append(_rgb(image.copy()))
    mean_ms = sum(durations) / len(durations) if durations else 0
    return frames, (1000.0 / mean_ms if count > 1 and mean_ms > 0 else None)


def clip_info(path: str | Path) -> ClipInfo:
    """Frame count, size and frame rate of a clip source, decoding it through (so a damaged file fails
    here); a `DifftuneError` naming the file when it cannot be read."""
    path = Path(path)
    kind = source_kind(path)
    try:
        if kind == "frames":
            files = frame_files(path)
            if not files:
                raise DifftuneError(f"{path}: a folder without frames ({', '.join(FRAME_SUFFIXES)})")
            sizes = set()
            for file in files:
                with Image.open(file) as image:
                    image.load()
                    sizes.add(ImageOps.exif_transpose(image).size)
            if len(sizes) > 1:
                shown = ", ".join(map(str, sorted(sizes)))
                raise DifftuneError(f"{path}: its frames differ in size ({shown})")
            (width, height), = sizes
            return ClipInfo(len(files), width, height, None)
        if kind == "video":
            av = _require_av(path)
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                count, size = 0, None
                for frame in container.decode(stream):
                    count, size = count + 1, (frame.width, frame.height)
                fps = float(stream.average_rate) if stream.average_rate else None
            if count == 0 or size is None:
                raise DifftuneError(f"{path}: the video holds no frames")
            return ClipInfo(count, size[0], size[1], fps)
        if kind in ("animated", "image"):
            with Image.open(path) as image:
                count = getattr(image, "n_frames", 1)
                durations = []
                for index in range(count):
                    image.seek(index)
                    image.load()
                    durations.append(image.info.get("duration") or 0)
                width, height = ImageOps.exif_transpose(image).size
            mean_ms = sum(durations) / count
            return ClipInfo(count, width, height, 1000.0 / mean_ms if count > 1 and mean_ms > 0 else None)
    except DifftuneError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError, Image.DecompressionBombError,
            IndexError) as err:
        raise DifftuneError(f"{path}: cannot read the clip (corrupt or truncated?): {err}") from None
    except Exception as err:  # PyAV's errors (av.error.*) and anything a damaged container raises
        if type(err).__module__.startswith("av"):
            raise DifftuneError(f"{path}: cannot read the clip (corrupt or truncated?): {err}") from None
        raise
    raise DifftuneError(f"{path}: not a clip")


# --- writing ----------------------------------------------------------------------------------------

def clip_grid(clips: Sequence[Clip], columns: int | None = None) -> Clip:
    """Several clips as one: frame k is the grid of every clip's frame k (clips end on their last frame)."""
    from ..sampling import image_grid

    length = max(len(clip) for clip in clips)
    return [image_grid([clip[min(k, len(clip) - 1)] for clip in clips], columns) for k in range(length)]


def frame_strip(clips: Sequence[Clip]) -> Image.Image:
    """One row per clip, its frames left to right: every frame at once, for a page or a PNG viewer."""
    width, height = clips[0][0].size
    length = max(len(clip) for clip in clips)
    strip = Image.new("RGB", (length * width, len(clips) * height), "white")
    for row, clip in enumerate(clips):
        for column, frame in enumerate(clip):
            strip.paste(frame.convert("RGB"), (column * width, row * height))
    return strip


def save_mp4(frames: Clip, path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    """An H.264 mp4 (yuv420p, what browsers and players take) through PyAV, atomically; sides are padded
    to even sizes as the codec needs."""
    av = _require_av(Path(path))
    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=round(fps))
            stream.width, stream.height, stream.pix_fmt = even[0], even[1], "yuv420p"
            stream.options = {"crf": "18"}
            for frame in frames:
                canvas = Image.new("RGB", even)
                canvas.paste(frame.convert("RGB"))
                for packet in stream.encode(av.VideoFrame.from_image(canvas)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    return atomic_write(path, write)


@dataclasses.dataclass(frozen=True)
class SavedClips:
    """The files `save_clip_grid` wrote (mp4 None without PyAV)."""

    webp: Path
    strip: Path
    mp4: Path | None


def save_clip_grid(clips: Sequence[Clip], stem: str | Path, fps: float = DEFAULT_FPS,
                   columns: int | None = None) -> SavedClips:
    """``<stem>.webp`` (the clips side by side, animated), ``<stem>.mp4`` where PyAV is installed and
    ``<stem>.png`` (the frame strip): what validation and the final samples of a video model write."""
    stem = Path(stem)
    grid = clip_grid(clips, columns)
    webp = save_webp(grid, stem.with_suffix(".webp"), fps)
    strip = save_image(stem.with_suffix(".png"), frame_strip(clips))
    mp4 = save_mp4(grid, stem.with_suffix(".mp4"), fps) if has_video_decoder() else None
    return SavedClips(webp, strip, mp4)


def frames_as_array(clip: Clip) -> np.ndarray:
    """(frames, H, W, 3) uint8."""
    return np.stack([np.asarray(frame.convert("RGB")) for frame in clip])


def clip_fps(fps: float | None) -> float:
    """The frame rate to write a clip at: its own, else Wan's 16 fps."""
    return fps if fps and math.isfinite(fps) and fps > 0 else DEFAULT_FPS
