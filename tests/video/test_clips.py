"""Clips in and out (difftune.video): every source kind decodes to the frames that were written, a training
folder is checked and described before any model loads, frame windows and buckets follow the flags, and
samples are written as animated WebP, mp4 and a frame strip."""

import numpy as np
import pytest
import torch
from conftest import make_clips, moving_square
from PIL import Image

from difftune.errors import DifftuneError
from difftune.video.clips import clip_info, frame_strip, read_clip, save_clip_grid, save_mp4, save_webp
from difftune.video.data import ClipLoader, FrameSampling, frame_indices, parse_resolution, scan_clip_folder


def arrays(frames):
    return np.stack([np.asarray(frame, dtype=np.int16) for frame in frames])


def test_every_source_kind_reads_back_its_frames(tmp_path):
    frames = moving_square(9)
    save_webp(frames, tmp_path / "clip.webp", fps=8)
    save_mp4(frames, tmp_path / "clip.mp4", fps=8)
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(frames):
        frame.save(tmp_path / "frames" / f"{index:02d}.png")
    frames[0].save(tmp_path / "still.png")
    webp, fps = read_clip(tmp_path / "clip.webp")
    assert np.array_equal(arrays(webp), arrays(frames)) and fps == pytest.approx(8, rel=0.05)  # lossless
    mp4, fps = read_clip(tmp_path / "clip.mp4")
    assert len(mp4) == 9 and fps == 8 and np.abs(arrays(mp4) - arrays(frames)).mean() < 12  # H.264: lossy
    folder, fps = read_clip(tmp_path / "frames", [0, 4, 8])
    assert np.array_equal(arrays(folder), arrays([frames[0], frames[4], frames[8]])) and fps is None
    sources = ("clip.webp", "clip.mp4", "frames", "still.png")
    assert [clip_info(tmp_path / name).frames for name in sources] == [9, 9, 9, 1]
    picked, _ = read_clip(tmp_path / "clip.webp", [6, 2])  # in the order asked for
    assert np.array_equal(arrays(picked), arrays([frames[6], frames[2]]))


def test_a_training_folder_is_described_before_loading(tmp_path):
    folder = make_clips(tmp_path / "clips")
    (tmp_path / "clips" / "notes.md").write_text("not a clip")
    with pytest.warns(UserWarning, match="skipping 1 file.*notes.md"):
        records = scan_clip_folder(folder, FrameSampling(num_frames=9, frame_buckets=(5,)))
    by_name = {r.path.name: r for r in records}
    assert sorted(by_name) == ["a.mp4", "b.webp", "c", "d.png"]
    assert by_name["a.mp4"].caption == "a sks square sliding" and by_name["b.webp"].caption is None
    assert [by_name[n].frames for n in ("a.mp4", "b.webp", "c", "d.png")] == [9, 9, 9, 1]  # a still: 1
    assert by_name["a.mp4"].fps == 8 and by_name["c"].fps is None
    (tmp_path / "clips" / "notes.md").unlink()
    # every 2nd frame: 9 frames give 5, 11 give 6: too short for 9, the bucket 5 fits both
    strided = {r.path.name: r for r in scan_clip_folder(folder, FrameSampling(9, frame_stride=2,
                                                                              frame_buckets=(5,)))}
    assert strided["a.mp4"].frames == strided["b.webp"].frames == 5
    assert frame_indices(strided["b.webp"], 0) == [0, 2, 4, 6, 8]
    # resampled from 8 to 4 fps: the same frames as stride 2 (a folder of frames has no rate to resample)
    (tmp_path / "timed").mkdir()
    (tmp_path / "clips" / "b.webp").rename(tmp_path / "timed" / "b.webp")
    (record,) = scan_clip_folder(tmp_path / "timed", FrameSampling(5, fps=4.0))
    assert record.step == 2 and frame_indices(record, 1) == [2, 4, 6, 8, 10]


def test_bad_clips_and_flags_are_named_in_one_line(tmp_path):
    folder = make_clips(tmp_path / "clips")
    too_short = r"^--instance_data_dir: clip .*a\.mp4 is too short: 9 frames give 9, --num_frames 13 needs"
    with pytest.raises(DifftuneError, match=too_short):
        scan_clip_folder(folder, FrameSampling(num_frames=13))
    with pytest.raises(DifftuneError, match=r"--num_frames 8: clips of this model have 1 \+ 4·k frames"):
        FrameSampling(num_frames=8)
    with pytest.raises(DifftuneError, match="--frame_buckets 6"):
        FrameSampling(num_frames=9, frame_buckets=(6,))
    with pytest.raises(DifftuneError, match="has no frame rate"):
        scan_clip_folder(folder, FrameSampling(num_frames=5, fps=4.0))  # the folder of frames
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(DifftuneError, match=r"^--class_data_dir: .*broken\.mp4: cannot read the clip"):
        scan_clip_folder(folder, FrameSampling(num_frames=5), "--class_data_dir")
    with pytest.raises(DifftuneError, match="give a size in pixels"):
        parse_resolution("wide")
    assert parse_resolution("480x832") == (480, 832) and parse_resolution("512") == 512


def test_the_loader_crops_every_frame_alike(tmp_path):
    folder = make_clips(tmp_path / "clips")
    record = next(r for r in scan_clip_folder(folder, FrameSampling(num_frames=5)) if r.path.name == "b.webp")
    pixels, size, crop = ClipLoader((16, 16), center_crop=True)(record, torch.Generator())
    # 24x20 frames cover 16x16 at 19x16: a centred crop 1 pixel from the left
    assert pixels.shape == (3, 5, 16, 16) and size == (20, 24) and crop == (0, 1)
    assert pixels.min() >= -1 and pixels.max() <= 1
    # the centred window of 5 of 11 frames starts at frame 3; every frame is resized and cropped alike
    for k in range(5):
        frame = moving_square(11, seed=1)[3 + k].resize((19, 16), Image.Resampling.BICUBIC)
        frame = frame.crop((1, 0, 17, 16))
        expected = torch.from_numpy(np.asarray(frame, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        torch.testing.assert_close(pixels[:, k], expected)
    drawn = [ClipLoader((16, 16))(record, torch.Generator().manual_seed(s)) for s in range(6)]
    assert len({(crop, round(pixels[0].sum().item(), 3)) for pixels, _, crop in drawn}) > 1  # drawn
    again = ClipLoader((16, 16))(record, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], drawn[0][0])


def test_samples_are_written_as_animated_webp_mp4_and_a_strip(tmp_path):
    clips = [moving_square(5, (16, 16), seed) for seed in range(2)]
    saved = save_clip_grid(clips, tmp_path / "samples", fps=8)
    with Image.open(saved.webp) as webp:
        assert webp.n_frames == 5 and webp.size == (32, 16)
    assert read_clip(saved.mp4)[0][0].size == (32, 16)
    strip = Image.open(saved.strip)
    assert strip.size == (5 * 16, 2 * 16)
    assert np.array_equal(np.asarray(strip), np.asarray(frame_strip(clips)))
    assert np.array_equal(np.asarray(strip.crop((48, 16, 64, 32))), np.asarray(clips[1][3]))
