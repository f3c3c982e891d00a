"""Training data: folder checks, captions, colour modes, EXIF, crops, the sample stream, batches."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.errors import DifftuneError
from difftune.training.data import (
    CLASS,
    INSTANCE,
    ImageRecord,
    SampleStream,
    SubjectData,
    SubjectDataset,
    open_rgb,
    resize_and_crop,
    sample_generator,
    scan_image_folder,
    warn_small_images,
)


def save_image(path, size=(48, 40), color=(200, 30, 60), mode="RGB"):
    Image.new(mode, size, color).save(path)
    return path


def test_missing_file_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(DifftuneError, match=r"--instance_data_dir .*nope: no such folder"):
        scan_image_folder(tmp_path / "nope")
    file = save_image(tmp_path / "a.png")
    with pytest.raises(DifftuneError, match="not a folder"):
        scan_image_folder(file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DifftuneError, match=r"empty: no images found"):
        scan_image_folder(empty, "--instance_data_dir")


def test_non_image_files_are_skipped_with_a_warning_naming_them(tmp_path):
    save_image(tmp_path / "dog.jpg")
    (tmp_path / "dog.txt").write_text("a sks dog on grass")  # a caption, not warned about
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.warns(UserWarning, match=r"skipping 2 file\(s\) that are not images: notes.md, weights.bin"):
        records = scan_image_folder(tmp_path)
    assert [r.path.name for r in records] == ["dog.jpg"]
    assert records[0].caption == "a sks dog on grass"


def test_known_metadata_files_are_skipped_silently(tmp_path):
    import warnings

    save_image(tmp_path / "dog.jpg")
    (tmp_path / "subject.json").write_text(json.dumps({"identifier": "sks", "class_name": "dog"}))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "dog.jpg", "text": "a dog"}) + "\n")
    (tmp_path / "dog.txt").write_text("a sks dog")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = scan_image_folder(tmp_path)
    assert [r.path.name for r in records] == ["dog.jpg"]


def test_the_shipped_subject_folders_give_no_warning():
    import warnings
    from pathlib import Path

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for folder in sorted((Path(__file__).resolve().parents[2] / "assets" / "subjects").iterdir()):
            records = scan_image_folder(folder)
            assert len(records) == 5 and all(r.caption and "sks" in r.caption for r in records)


def test_corrupt_and_truncated_images_are_named(tmp_path):
    save_image(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DifftuneError, match=r"cannot read image .*bad.png"):
        scan_image_folder(tmp_path)
    other = tmp_path / "trunc"
    other.mkdir()
    big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(other / "cut.jpg", quality=95)
    data = (other / "cut.jpg").read_bytes()
    (other / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DifftuneError, match=r"cut.jpg \(corrupt or truncated\?\)"):
        scan_image_folder(other, "--class_data_dir")


def test_small_images_warn(tmp_path):
    records = [ImageRecord(tmp_path / "s.png", 30, 50), ImageRecord(tmp_path / "b.png", 80, 90)]
    with pytest.warns(UserWarning, match=r"1 image\(s\) smaller than --resolution 64 .*s.png \(30x50\)"):
        warn_small_images(records, 64, "--instance_data_dir")


def test_captions_from_metadata_jsonl_and_sidecars(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        save_image(tmp_path / name)
    rows = [{"file_name": "a.png", "text": "caption a"}, {"file_name": "b.png", "caption": "caption b"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.txt").write_text("sidecar b\n")
    captions = {r.path.name: r.caption for r in scan_image_folder(tmp_path)}
    assert captions == {"a.png": "caption a", "b.png": "sidecar b", "c.png": None}
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "label": "x"}\n')
    assert scan_image_folder(tmp_path, caption_column="label")[0].caption == "x"
    with pytest.raises(DifftuneError, match=r"metadata.jsonl line 1 needs 'file_name' and one of"):
        scan_image_folder(tmp_path)


def test_colour_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent: composited on white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black over white: mid grey
    rgba.save(tmp_path / "rgba.png")
    image = np.asarray(open_rgb(tmp_path / "rgba.png"))
    assert image.shape == (4, 4, 3)
    assert tuple(image[0, 0]) == (255, 255, 255) and tuple(image[1, 1]) == (255, 0, 0)
    assert np.all(np.abs(image[0, 1].astype(int) - 127) <= 1)

    Image.new("L", (4, 4), 90).save(tmp_path / "gray.png")
    assert np.all(np.asarray(open_rgb(tmp_path / "gray.png")) == 90)

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    red = np.asarray(open_rgb(tmp_path / "cmyk.jpg")).astype(int)
    assert np.all(red[..., 0] > 240) and np.all(red[..., 1:] < 15)

    sixteen = Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))
    sixteen.save(tmp_path / "deep.png")
    assert np.all(np.abs(np.asarray(open_rgb(tmp_path / "deep.png")).astype(int) - 127) <= 1)

    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 756)
    palette.save(tmp_path / "pal.png")
    assert tuple(np.asarray(open_rgb(tmp_path / "pal.png"))[0, 0]) == (70, 80, 90)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape, left half red
    pixels[:, :20] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # camera rotated: display rotated 90° clockwise
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    (record,) = scan_image_folder(tmp_path)
    assert (record.width, record.height) == (20, 40)
    upright = np.asarray(open_rgb(tmp_path / "rot.jpg")).astype(int)
    assert upright.shape == (40, 20, 3)
    # rotating clockwise puts the left (red) half at the top
    assert upright[5, 10, 0] > 200 and upright[35, 10, 0] < 50


def test_resize_and_crop_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    pixels, original, crop = resize_and_crop(image, 32, center_crop=True, generator=torch.Generator())
    assert original == (60, 90) and crop == (0, 8)  # resized to 32x48, centre column offset 8
    expected = np.asarray(image.resize((48, 32), Image.Resampling.BICUBIC).crop((8, 0, 40, 32)),
                          dtype=np.float32) / 127.5 - 1
    assert torch.equal(pixels, torch.from_numpy(expected).permute(2, 0, 1))
    corners = {resize_and_crop(image, 32, False, torch.Generator().manual_seed(s))[2] for s in range(20)}
    assert all(top == 0 and 0 <= left <= 16 for top, left in corners) and len(corners) > 3


def test_sample_stream_visits_every_item_once_per_epoch_and_is_reproducible():
    stream = SampleStream(5, seed=3)
    epochs = [[stream.index(e * 5 + i) for i in range(5)] for e in range(3)]
    assert all(sorted(order) == list(range(5)) for order in epochs)
    assert len({tuple(order) for order in epochs}) > 1
    again = SampleStream(5, seed=3)
    assert [again.index(p) for p in range(12, 2, -1)] == [stream.index(p) for p in range(12, 2, -1)]


def test_sample_generators_are_independent_per_key():
    draw = [torch.randn(3, generator=sample_generator(0, 1, p)) for p in range(3)]
    assert not torch.equal(draw[0], draw[1])
    assert torch.equal(draw[2], torch.randn(3, generator=sample_generator(0, 1, 2)))
    assert not torch.equal(torch.randn(3, generator=sample_generator(1, 1, 2)), draw[2])


def _records(tmp_path, count, prefix):
    rng = np.random.default_rng(len(prefix))
    paths = []
    for i in range(count):
        path = tmp_path / f"{prefix}{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(ImageRecord(path, 48, 40))
    return paths


def test_dataset_pairs_instance_and_class_images(tmp_path):
    dataset = SubjectDataset(_records(tmp_path, 2, "i"), "a sks dog", _records(tmp_path, 3, "c"), "a dog")
    assert len(dataset) == 3 and dataset.with_prior
    pairs = [[(e.kind, e.index, e.prompt) for e in dataset.item(i)] for i in range(3)]
    assert pairs[2] == [(INSTANCE, 0, "a sks dog"), (CLASS, 2, "a dog")]
    assert dataset.prompts() == ["a sks dog", "a dog"]



def test_captioned_class_images_keep_their_captions(tmp_path):
    import dataclasses

    classes = _records(tmp_path, 2, "c")
    classes[1] = dataclasses.replace(classes[1], caption="a small dog on a gray background")
    dataset = SubjectDataset(_records(tmp_path, 2, "i"), "a sks dog", classes, "a dog")
    assert [e.prompt for e in dataset.classes] == ["a dog", "a small dog on a gray background"]
    # captions alone are enough; an uncaptioned class image needs the class prompt
    captioned = [dataclasses.replace(r, caption=f"a dog {i}") for i, r in enumerate(classes)]
    only_captions = SubjectDataset(_records(tmp_path, 1, "i"), "a sks dog", captioned)
    assert [e.prompt for e in only_captions.classes] == ["a dog 0", "a dog 1"]
    with pytest.raises(DifftuneError, match="class images need a class prompt"):
        SubjectDataset(_records(tmp_path, 1, "i"), "a sks dog", classes)


def _fake_encoders():
    def encode_images(pixels):  # a stand-in VAE: mean = 2x2 average pooling, logvar = -2
        mean = torch.nn.functional.avg_pool2d(pixels, 2)
        return torch.cat([mean, torch.full_like(mean, -2.0)], dim=1)

    def encode_prompts(prompts):
        return {"prompt_embeds": torch.stack([torch.full((2, 3), float(len(p))) for p in prompts])}

    return encode_images, encode_prompts


@pytest.mark.parametrize("random_flip", [False, True])
def test_cached_and_uncached_batches_agree(tmp_path, random_flip):
    encode_images, encode_prompts = _fake_encoders()
    dataset = SubjectDataset(_records(tmp_path, 3, "i"), "a sks dog", _records(tmp_path, 2, "c"), "a dog")

    def data(cache):
        made = SubjectData(dataset, encode_images=encode_images, encode_prompts=encode_prompts, resolution=32,
                           center_crop=True, random_flip=random_flip, seed=5, cache_latents=cache,
                           cache_prompts=cache, device=torch.device("cpu"))
        made.build_caches(show_progress=False)
        return made

    cached, direct = data(True), data(False)
    for positions in ([0], [1, 2], [5, 6, 7]):
        a, b = cached.batch(positions), direct.batch(positions)
        assert torch.allclose(a.moments, b.moments, atol=1e-6)
        assert torch.equal(a.conditioning["prompt_embeds"], b.conditioning["prompt_embeds"])
        assert torch.equal(a.is_prior, torch.tensor([False] * len(positions) + [True] * len(positions)))
        assert torch.equal(a.original_sizes, torch.tensor([[40, 48]] * 2 * len(positions)))
        # the rest of the step's randomness continues identically from both
        assert all(torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=h))
                   for g, h in zip(a.generators, b.generators, strict=True))
    if random_flip:  # some instance examples come flipped, some not
        flipped = []
        for position in range(12):
            instance = dataset.item(cached.stream.index(position))[0]
            mirrored = encode_images(cached._pixels(instance, True, torch.Generator())[0][None])
            flipped.append(torch.allclose(cached.batch([position]).moments[:1], mirrored))
        assert any(flipped) and not all(flipped)
