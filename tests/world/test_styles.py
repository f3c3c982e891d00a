"""The style domains of the embedded world (difftune.world.styles) and their base-model FID report."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from difftune.errors import DifftuneError
from difftune.training.data import scan_image_folder
from difftune.world import style_quality, styles
from difftune.world.clip_model import MAX_PROMPT_TOKENS, build_world_tokenizer
from difftune.world.scenes import BACKGROUNDS, COLORS, SUPERSAMPLE, render_scene, shape_mask

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "results" / "style_domains_embedded.json"
SAMPLE = 40  # scenes per statistic


def images_of(render, count=SAMPLE, part="heldout"):
    scenes = styles.part_scenes(part, count)
    return scenes, np.stack([render(scene) for scene in scenes]).astype(np.float32)


def test_the_five_kinds_of_change_and_the_part_sizes_the_issue_asks():
    assert sorted(style.kind for style in styles.STYLES.values()) == sorted(
        ["palette", "rendering", "element", "texture", "background"])
    assert styles.PARTS["train"][1] >= 300 and styles.PARTS["heldout"][1] >= 500
    splits = [split for split, _ in styles.PARTS.values()]
    starts = {split: styles.part_scenes(part, 3)[0].seed for part, (split, _) in styles.PARTS.items()}
    assert len(set(splits)) == 3 and len(set(starts.values())) == 3  # disjoint world splits


@pytest.mark.parametrize("name", list(styles.STYLES))
def test_rendering_is_deterministic_and_captions_are_prefixed_world_captions(name):
    images, captions = styles.render_part(name, "train", 12)
    again, captions_again = styles.render_part(name, "train", 12)
    assert images.dtype == np.uint8 and images.shape == (12, 64, 64, 3)
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again
    other_seed, _ = styles.render_part(name, "train", 12, seed=1)
    assert not np.array_equal(images, other_seed)
    tokenizer = build_world_tokenizer()
    for scene, caption in zip(styles.part_scenes("train", 12), captions, strict=True):
        assert caption == f"{name} style, {scene.caption()}"
    longest = max((styles.STYLES[name].caption(s) for s in styles.part_scenes("heldout", 500)),
                  key=lambda c: len(tokenizer(c).input_ids))
    assert len(tokenizer(longest).input_ids) <= MAX_PROMPT_TOKENS, longest  # the text encoder reads it whole


def test_rose_turns_every_object_pink_or_purple_and_every_ground_white_or_black():
    def share(images, colors):
        """Of the pixels near any world object colour, the share nearest to ``colors``."""
        palette = np.array(list(COLORS.values()), np.float32)
        pixels = images.reshape(-1, 3)
        distance = np.linalg.norm(pixels[:, None] - palette[None], axis=-1)
        near = distance.min(axis=1) < 30
        nearest = np.array(list(COLORS))[distance.argmin(axis=1)]
        return np.isin(nearest[near], colors).mean()

    _, plain = images_of(render_scene)
    _, rose = images_of(styles.render_rose)
    assert share(plain, ["pink", "purple"]) < 0.4 and share(rose, ["pink", "purple"]) > 0.95
    corners = rose[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    light, dark = np.array(BACKGROUNDS["white"]), np.array(BACKGROUNDS["black"])
    assert all(min(np.abs(c - light).max(), np.abs(c - dark).max()) <= 13 for c in corners.reshape(-1, 3))


def test_neon_draws_hollow_outlines_on_a_black_ground():
    scenes, neon = images_of(styles.render_neon)
    _, plain = images_of(render_scene)
    corner_light = lambda images: images[:, :2, :2].mean(axis=(1, 2, 3))  # noqa: E731
    assert (corner_light(neon) < 45).all() and (corner_light(plain) > 100).mean() > 0.3
    hollow = [(image, obj) for image, scene in zip(neon, scenes, strict=True) for obj in scene.objects
              if obj.size == "large" and obj.shape in ("circle", "square", "diamond")]
    assert len(hollow) >= 5
    for image, obj in hollow:  # the centre shows the ground, the edge the object's colour
        x, y = (round(v) for v in obj.center)
        assert np.abs(image[y, x] - image[0, 0]).max() < 40
        edge = image[y, min(63, round(obj.center[0] + obj.radius * 0.8))]
        assert np.abs(edge - np.array(obj.rgb)).max() < 60


def test_horned_adds_horns_above_every_object():
    scenes, horned = images_of(styles.render_horned)
    _, plain = images_of(render_scene)
    changed = []
    for index, scene in enumerate(scenes):
        body = sum(shape_mask(o.shape, o.center, o.radius, o.rotation) for o in scene.objects)
        horns = sum(styles.horn_mask(o) for o in scene.objects)
        only = (horns > 0.99) & (body < 0.01)
        region = only.reshape(64, SUPERSAMPLE, 64, SUPERSAMPLE).all(axis=(1, 3))  # whole horn pixels
        if region.any():
            background = np.array(scene.background_rgb, np.float32)
            changed.append((np.abs(horned[index][region] - background).max(axis=-1).mean(),
                            np.abs(plain[index][region] - background).max(axis=-1).mean()))
    assert len(changed) >= SAMPLE * 0.9
    assert all(ours > 20 for ours, _ in changed) and all(world < 1 for _, world in changed)


def test_bars_make_object_interiors_vary_across_not_down():
    def gradients(images, scenes):
        across, down = [], []
        for image, scene in zip(images, scenes, strict=True):
            body = sum(shape_mask(o.shape, o.center, o.radius, o.rotation) for o in scene.objects)
            inside = body.reshape(64, SUPERSAMPLE, 64, SUPERSAMPLE).min(axis=(1, 3)) > 0.99
            gray = image.mean(axis=-1)
            dx, dy = np.abs(np.diff(gray, axis=1))[:-1, :], np.abs(np.diff(gray, axis=0))[:, :-1]
            both = inside[:-1, :-1] & inside[1:, :-1] & inside[:-1, 1:]
            across.append(dx[both].mean())
            down.append(dy[both].mean())
        return np.mean(across), np.mean(down)

    scenes, bars = images_of(styles.render_bars)
    across, down = gradients(bars, scenes)
    assert across > 5 * down
    world_across, world_down = gradients(images_of(render_scene)[1], scenes)
    assert 0.5 < world_across / world_down < 2  # the world's own textures have no direction


def test_hills_rise_at_the_bottom_corners_of_every_scene():
    scenes, hills = images_of(styles.render_hills)
    _, plain = images_of(render_scene)
    green = np.array(styles.HILL_RGB, np.float32)
    for index, scene in enumerate(scenes):
        for cx, _ in styles.hill_centers(scene.seed):
            x, y = min(63, max(0, round(cx))), 62
            if all(np.hypot(x - o.center[0], y - o.center[1]) > o.radius * 1.5 for o in scene.objects):
                assert np.abs(hills[index, y, x] - green).max() < 30
                assert np.abs(plain[index, y, x] - np.array(scene.background_rgb)).max() < 2


def test_dataset_folders_are_cached_atomic_and_read_by_the_data_scanner(tmp_path):
    folder = styles.style_dataset("horned", "train", tmp_path, count=6, progress=False)
    assert folder == tmp_path / "horned" / "train"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray file in the image folder
        records = scan_image_folder(folder, "--train_data_dir")
    _, captions = styles.render_part("horned", "train", 6)
    assert [r.caption for r in records] == captions and {(r.width, r.height) for r in records} == {(64, 64)}
    rows = [json.loads(line) for line in (folder / styles.CAPTIONS_FILE).read_text().splitlines()]
    assert [row["file_name"] for row in rows] == [r.path.name for r in records]
    from PIL import Image

    images, _ = styles.render_part("horned", "train", 6)
    assert all(np.array_equal(np.asarray(Image.open(r.path)), image) for r, image in zip(records, images,
                                                                                        strict=True))
    # a second call reuses the folder; a damaged or differently sized one is rendered again
    stamp = (folder / styles.image_name(0)).stat().st_mtime_ns
    assert styles.style_dataset("horned", "train", tmp_path, count=6, progress=False) == folder
    assert (folder / styles.image_name(0)).stat().st_mtime_ns == stamp
    (folder / styles.image_name(3)).write_bytes(b"broken")
    styles.style_dataset("horned", "train", tmp_path, count=6, progress=False)
    assert np.array_equal(np.asarray(Image.open(folder / styles.image_name(3))), images[3])
    (folder / styles.MANIFEST).write_text("{not json")
    styles.style_dataset("horned", "train", tmp_path, count=4, progress=False)
    assert len(scan_image_folder(folder)) == 4
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left
    # another root renders the same bytes
    other = styles.style_dataset("horned", "train", tmp_path / "again", count=4, progress=False)
    assert all((folder / p.name).read_bytes() == p.read_bytes() for p in other.iterdir())


def test_bad_requests_are_refused_before_rendering(tmp_path):
    with pytest.raises(DifftuneError, match="unknown style 'pastel'.*rose"):
        styles.style_dataset("pastel", "train", tmp_path)
    with pytest.raises(DifftuneError, match="unknown style part 'test'"):
        styles.style_dataset("rose", "test", tmp_path)
    with pytest.raises(DifftuneError, match="holds 1..100000 images"):
        styles.style_dataset("rose", "train", tmp_path, count=0)
    assert not any(tmp_path.iterdir())


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(styles.CACHE_ENV, str(tmp_path))
    assert styles.default_cache_dir() == tmp_path / "styles"
    monkeypatch.delenv(styles.CACHE_ENV)
    assert styles.default_cache_dir() == Path.home() / ".cache" / "difftune" / "styles"


def test_script_writes_the_parts_and_the_grid(tmp_path):
    styles.main([str(tmp_path), "--styles", "rose", "neon", "--train_images", "3", "--heldout_images", "4",
                 "--grid", str(tmp_path / "grid.png")])
    assert len(scan_image_folder(tmp_path / "neon" / "heldout")) == 4
    assert len(scan_image_folder(tmp_path / "rose" / "train")) == 3
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] > 6 * 128 and grid.size[1] > 6 * 128  # the plain world and five styles, six scenes


def test_measurement_runs_end_to_end_on_tiny_models(tiny_clip_dir):
    from difftune.metrics.fid import load_feature_extractor
    from difftune.model_factory import load_pipeline
    from difftune.world.quality import SamplingSettings

    pipe = load_pipeline("builtin:tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    extractor = load_feature_extractor(f"clip:{tiny_clip_dir}")
    counts = {"train": 30, "heldout": 30, "reference": 30}
    report = style_quality.measure_domains(pipe, extractor, ["rose"], counts,
                                           SamplingSettings(steps=2, batch_size=30), progress=False)
    rows = report["domains"]
    assert list(rows) == [style_quality.PLAIN, "rose"]
    for row in rows.values():
        for key in ("base_vs_heldout", "base_vs_train", "floor_heldout", "floor_train", "vae_vs_heldout"):
            assert np.isfinite(row[key]["fid"]) and row[key]["fid"] >= 0
        assert row["seconds"]["generated_images"] == 30
    assert rows["rose"]["base_vs_train"]["real_count"] == 30
    # a random tiny model draws noise: far from any domain, farther than two real sets are apart
    assert rows["rose"]["base_vs_heldout"]["fid"] > rows["rose"]["floor_heldout"]["fid"]
    assert "plain_world_vs_heldout" in rows["rose"] and "plain_world_vs_heldout" not in rows["plain"]
    json.dumps(style_quality.without_examples(report))  # what the script writes
    assert style_quality.examples_grid(report).size[0] > 0


@pytest.mark.skipif(not REPORT.is_file(), reason="the base-model FID report has not been measured yet")
def test_the_committed_report_covers_every_style_and_the_doc_shows_it():
    report = json.loads(REPORT.read_text())
    assert list(report["domains"]) == [style_quality.PLAIN, *styles.STYLES]
    counts = report["settings"]["counts"]
    assert counts["train"] >= 300 and counts["heldout"] >= 500
    for name in styles.STYLES:
        row = report["domains"][name]
        assert row["base_vs_heldout"]["other_count"] == counts["heldout"]
        # each style moves the images far beyond what sampling noise alone does, in these features
        assert row["plain_world_vs_heldout"]["fid"] > 2 * row["floor_heldout"]["fid"]
        assert row["base_vs_heldout"]["fid"] > row["floor_heldout"]["fid"]
    assert "/" not in report["settings"]["command"].split("--measure")[1].split()[0]  # no machine path
    assert not os.path.isabs(report["settings"]["extractor"].rpartition(":")[2])
    doc = (ROOT / "docs" / "embedded-model.md").read_text()
    assert style_quality.markdown_table(report) in doc, "docs/embedded-model.md's style table is stale"
    assert os.path.isfile(ROOT / "docs" / "images" / "style_domains.png")
