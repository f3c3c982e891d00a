"""The dataset trainer's data: captioned folders and datasets, bad examples, aspect buckets, caption
dropout, the moving average of the adapter, presets."""

import json
import math
from collections import Counter

import pytest
import torch
from conftest import TinyNet, make_style_images
from PIL import Image

import difftune
from difftune.errors import DifftuneError
from difftune.families import FAMILIES
from difftune.training import buckets, captioned, recipes
from difftune.training.data import SubjectDataset, open_record, resize_and_crop
from difftune.training.ema import AdapterEMA


def source(folder=None, **options):
    return captioned.CaptionedSource(train_data_dir=str(folder) if folder else None, **options)


# --- sources and checks ------------------------------------------------------------------

def test_folder_captions_come_from_metadata_and_sidecars_with_the_prefix(tmp_path):
    folder = make_style_images(tmp_path / "s", sizes=((40, 32), (32, 40), (32, 32)))
    (folder / "1.txt").write_text("  a sidecar caption \n")
    records = captioned.read_examples(source(folder, caption_prefix="zz style,"))
    assert [r.caption for r in records] == ["zz style, a red disc 0", "zz style, a sidecar caption",
                                            "zz style, a red disc 2"]
    assert [(r.width, r.height) for r in records] == [(40, 32), (32, 40), (32, 32)]
    assert captioned.read_examples(source(folder, caption_prefix="zz ", max_train_samples=2))[1].caption == \
        "zz a sidecar caption"


def test_every_bad_image_and_caption_is_named_in_one_line(tmp_path):
    folder = make_style_images(tmp_path / "s", sizes=((32, 32),) * 4)
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["file_name"] != "2.png"] + [{"file_name": "gone.png", "text": "x"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DifftuneError) as caught:
        captioned.read_examples(source(folder))
    message = str(caught.value)
    assert "\n" not in message and "3 bad example(s)" in message and "--skip_bad_examples" in message
    assert "1.png: unreadable" in message and "2.png: no caption" in message
    assert "metadata.jsonl names gone.png" in message
    with pytest.warns(UserWarning, match=r"3 bad example\(s\).*left out"):
        records = captioned.read_examples(source(folder, skip_bad_examples=True))
    assert [r.path.name for r in records] == ["0.png", "3.png"]
    with pytest.raises(DifftuneError, match="one of the two"):
        captioned.read_examples(captioned.CaptionedSource())


def test_a_datasets_dataset_by_local_path_with_its_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "data"
    folder.mkdir()
    for i, size in enumerate([(40, 32), (32, 48), (32, 32)]):
        Image.new("RGB", size, (i * 60, 20, 20)).save(folder / f"{i}.png")
    labels = ["one", "two", " "]
    rows = [{"file_name": f"{i}.png", "label": label} for i, label in enumerate(labels)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    saved = tmp_path / "saved"
    datasets.load_dataset(str(folder), split="train").save_to_disk(str(saved))
    for name in (folder, saved):  # a data folder (load_dataset) and a save_to_disk folder
        flags = {"dataset_name": str(name), "caption_column": "label"}
        with pytest.raises(DifftuneError, match=r"1 bad example\(s\): row 2: empty caption"):
            captioned.read_examples(captioned.CaptionedSource(**flags))
        records = captioned.read_examples(captioned.CaptionedSource(**flags, max_train_samples=2,
                                                                    caption_prefix="s,"))
        assert [(r.caption, r.width, r.height) for r in records] == [("s, one", 40, 32), ("s, two", 32, 48)]
        pixels = resize_and_crop(open_record(records[1]), 16, True, torch.Generator())[0]
        assert torch.allclose(pixels[0], torch.full((16, 16), 60 / 127.5 - 1))  # the image of row 1
    with pytest.raises(DifftuneError, match=r"no column 'text' or 'caption' or 'prompt'.*image, label"):
        captioned.read_examples(captioned.CaptionedSource(dataset_name=str(saved)))
    with pytest.raises(DifftuneError, match=r"--image_column 'picture' is not a column"):
        captioned.read_examples(captioned.CaptionedSource(dataset_name=str(saved), image_column="picture",
                                                          caption_column="label"))
    with pytest.raises(DifftuneError, match="cannot load it"):
        captioned.read_examples(captioned.CaptionedSource(dataset_name=str(tmp_path / "nothing-here")))


# --- aspect buckets -------------------------------------------------------------------------

def test_bucket_grid_against_a_brute_force_search():
    grid = buckets.BucketSettings(resolution=512, min_side=256, max_side=1024, step=64)
    sizes = buckets.bucket_sizes(grid)
    sides = range(256, 1025, 64)
    # every width's tallest height within the area, and nothing else
    widest = {(max(h for h in sides if h * w <= 512 ** 2), w) for w in sides
              if any(h * w <= 512 ** 2 for h in sides)}
    expected = widest | {(w, h) for h, w in widest}
    assert set(sizes) == expected and (512, 512) in sizes and (256, 1024) in sizes
    assert all(h * w <= 512 ** 2 for h, w in sizes)
    ratios = [w / h for h, w in sizes]
    assert ratios == sorted(ratios, reverse=True)
    by_ratio = min(sizes, key=lambda s: abs(math.log(s[1] / s[0]) - math.log(2.0)))
    assert buckets.nearest_bucket(1000, 500, sizes) == by_ratio
    assert buckets.nearest_bucket(500, 1000, sizes) == by_ratio[::-1]
    with pytest.raises(DifftuneError, match="--bucket_step must be a positive multiple of 16"):
        buckets.BucketSettings(512, 256, 1024, 40).check(16)
    with pytest.raises(DifftuneError, match="--bucket_min_side <= --resolution"):
        buckets.BucketSettings(512, 600, 1024, 64).check(8)


def test_bucket_stream_draws_each_block_from_one_bucket_and_every_example_each_epoch():
    assigned = [(8, 8)] * 5 + [(8, 16)] * 2 + [(16, 8)] * 1
    stream = buckets.BucketStream(assigned, block=2, seed=3)
    assert stream.length == 6 + 2 + 2  # each bucket filled up to whole blocks
    for epoch in range(3):
        order = [stream.index(epoch * stream.length + i) for i in range(stream.length)]
        assert set(order) == set(range(8))
        for start in range(0, stream.length, 2):
            assert len({assigned[i] for i in order[start:start + 2]}) == 1
    again = buckets.BucketStream(assigned, block=2, seed=3)
    assert [again.index(p) for p in range(29, 3, -1)] == [stream.index(p) for p in range(29, 3, -1)]
    assert buckets.describe_counts(assigned) == "8x8: 5, 16x8: 2, 8x16: 1"


def test_resize_and_crop_to_a_bucket_covers_it():
    image = Image.new("RGB", (90, 60))
    pixels, original, (top, left) = resize_and_crop(image, (40, 80), True, torch.Generator())
    assert pixels.shape == (3, 40, 80) and original == (60, 90)
    assert (top, left) == (6, 0)  # scaled by 80/90 to 80x53, 13 rows to crop


# --- the data: buckets in batches, caption dropout -----------------------------------------

def _data(tmp_path, dropout=0.0, with_buckets=True, block=2):
    folder = make_style_images(tmp_path / "s", sizes=((32, 32), (48, 24), (32, 32), (24, 48), (48, 24)))
    records = captioned.read_examples(source(folder))
    grid = buckets.bucket_sizes(buckets.BucketSettings(32, 16, 64, 8))
    assigned = [buckets.nearest_bucket(r.width, r.height, grid) for r in records] if with_buckets else None

    def encode_images(pixels):
        return torch.cat([pixels[:, :, ::2, ::2], torch.zeros_like(pixels[:, :, ::2, ::2])], dim=1)

    def encode_prompts(prompts):
        return {"prompt_embeds": torch.stack([torch.full((2,), float(len(p))) for p in prompts])}

    data = captioned.CaptionedData(SubjectDataset(records, ""), caption_dropout=dropout, buckets=assigned,
                                   block=block, encode_images=encode_images, encode_prompts=encode_prompts,
                                   resolution=32, center_crop=False, random_flip=True, seed=1,
                                   cache_latents=True, cache_prompts=True, device=torch.device("cpu"))
    data.build_caches(show_progress=False)
    return data, assigned


def test_batches_come_from_one_bucket_at_its_size(tmp_path):
    data, assigned = _data(tmp_path)
    assert data.epoch_length == 6  # 2 + 2 + 1 images in three buckets, blocks of 2
    for start in range(0, 24, 2):
        batch = data.batch(range(start, start + 2))
        (height, width), = {assigned[data.stream.index(p)] for p in range(start, start + 2)}
        assert batch.moments.shape == (2, 6, height // 2, width // 2)


def test_caption_dropout_empties_its_share_of_captions_reproducibly(tmp_path):
    data, _ = _data(tmp_path, dropout=0.3, with_buckets=False)
    assert "" in data.prompt_cache
    prompts = [data.example_prompt(p, data.dataset.instance[0]) for p in range(2000)]
    share = prompts.count("") / len(prompts)
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)
    assert Counter(prompts)["a red disc 0"] == len(prompts) - prompts.count("")
    again, _ = _data(tmp_path / "again", dropout=0.3, with_buckets=False)
    assert [again.example_prompt(p, again.dataset.instance[0]) for p in range(2000)] == prompts
    assert torch.equal(data.batch(range(4)).conditioning["prompt_embeds"],
                       again.batch(range(4)).conditioning["prompt_embeds"])


# --- moving average -------------------------------------------------------------------------

def test_the_moving_average_follows_diffusers_rule_and_swaps_in_and_out():
    model = TinyNet()
    difftune.add_adapter(model, "lora", targets=["to_q", "to_k"], rank=2)
    parameters = difftune.trainable_parameters(model)
    ema = AdapterEMA([model], decay=0.9)
    expected = [p.detach().clone() for p in parameters]
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 30):
        with torch.no_grad():
            for p in parameters:
                p.add_(torch.randn(p.shape, generator=generator))
        ema.step()
        decay = 0.0 if step == 1 else min(0.9, step / (9 + step))  # (1 + n) / (10 + n) with n = step - 1
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, parameters, strict=True)]
    trained = [p.detach().clone() for p in parameters]
    with ema.applied():
        assert all(torch.allclose(p, e, atol=1e-5) for p, e in zip(parameters, expected, strict=True))
    assert all(torch.equal(p, t) for p, t in zip(parameters, trained, strict=True))
    other = AdapterEMA([model], decay=0.9)
    other.load_state_dict(ema.state_dict())
    with other.applied():
        assert all(torch.allclose(p, e, atol=1e-5) for p, e in zip(parameters, expected, strict=True))
    with pytest.raises(ValueError, match="holds 1 tensors"):
        other.load_state_dict({**ema.state_dict(), "shadow_params": [torch.zeros(3)]})


# --- presets ----------------------------------------------------------------------------------

def test_every_trainable_family_has_a_preset_of_a_real_checkpoint():
    families = {preset["family"] for preset in recipes.DATASET_PRESETS.values()}
    assert families == {name for name, family in FAMILIES.items() if family.trainable and not family.video}
    for preset in recipes.DATASET_PRESETS.values():
        assert "/" in preset["pretrained_model_name_or_path"]  # a hub id
        assert preset["resolution"] % 64 == 0 and 0 < preset["learning_rate"] < 1e-3
