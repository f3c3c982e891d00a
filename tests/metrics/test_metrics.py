"""Metrics against independent computations: closed-form FID, hand-made KID, cosines by hand.

Models are tiny random transformers models built from configs, saved to a temporary
folder and loaded back by path, so the path API is what gets tested.
"""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP_MEAN as PROCESSOR_MEAN
from conftest import TINY_CLIP_STD as PROCESSOR_STD
from conftest import save_tiny_vision_model
from PIL import Image

from difftune.errors import DifftuneError
from difftune.metrics import (
    ClipImageFeatures,
    ClipSimilarity,
    DinoImageFeatures,
    DinoSimilarity,
    compute_fid,
    frechet_distance,
    kernel_distance,
    load_feature_extractor,
    neutral_prompt,
    vlhi,
)
from difftune.metrics.features import extract_features, image_batches
from difftune.metrics.reporting import image_grid, markdown_table, scatter_plot, write_csv


@pytest.fixture
def clip_dir(tiny_clip_dir):
    return tiny_clip_dir


@pytest.fixture(scope="module", params=["dinov2", "vit"])
def dino_dir(request, tmp_path_factory):
    return save_tiny_vision_model(tmp_path_factory.mktemp(request.param), request.param)


def random_images(count: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


# ---------------------------------------------------------------- FID / KID

def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of the two samples' Gaussians, via symmetric eigendecompositions in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def test_fid_of_gaussian_feature_sets_equals_closed_form():
    rng = np.random.default_rng(0)
    dim = 6
    mix_a, mix_b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    a = rng.normal(size=(3000, dim)) @ mix_a + 1.0
    b = rng.normal(size=(2500, dim)) @ mix_b - 0.5
    fid = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert fid == pytest.approx(reference_fid(a, b), rel=1e-8)


def test_fid_against_a_stored_reference_equals_torchmetrics():
    from difftune.metrics.fid import FidReference

    rng = np.random.default_rng(2)
    real = torch.from_numpy(rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)))
    reference = FidReference(real)
    for shift in (0.0, 0.7):
        generated = torch.from_numpy(rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + shift)
        assert reference.distance(generated) == pytest.approx(frechet_distance(real, generated), rel=1e-6)
        assert reference.distance(generated) == pytest.approx(reference_fid(real.numpy(), generated.numpy()),
                                                              rel=1e-6)


def test_fid_approaches_population_closed_form_for_diagonal_gaussians():
    # N(mu1, diag(s1²)) vs N(mu2, diag(s2²)): FID = |mu1 - mu2|² + Σ (s1 - s2)²
    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([0.5, 0.0, 2.0, 1.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    a = mu1 + s1 * rng.normal(size=(200_000, 4))
    b = mu2 + s2 * rng.normal(size=(200_000, 4))
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=0.01)


def test_fid_of_a_set_with_itself_is_zero(clip_dir):
    extractor = load_feature_extractor(f"clip:{clip_dir}")
    images = random_images(40, seed=3)
    result = compute_fid(images, images, extractor, batch_size=16, kid=True, kid_subsets=5, progress=False)
    assert abs(result.fid) < 1e-6
    other = compute_fid(images, random_images(40, seed=4), extractor, batch_size=16, kid=False,
                        progress=False)
    assert other.fid > 1e-3  # the same code does see a difference


def test_fid_result_records_how_it_was_measured(clip_dir):
    extractor = load_feature_extractor(f"clip:{clip_dir}", antialias=False)
    result = compute_fid(random_images(12, 5), random_images(9, 6, size=48), extractor, batch_size=8,
                         kid_subsets=3, kid_subset_size=1000, progress=False)
    info = result.to_dict()
    assert info["extractor"] == f"clip:{clip_dir}"
    assert info["num_features"] == 24
    assert info["real_count"] == 12 and info["generated_count"] == 9
    assert "shorter side to 32" in info["resize"] and "not antialiased" in info["resize"]
    assert info["kid_subset_size"] == 9  # cut to the smaller set
    assert "12 real / 9 generated" in result.describe()


def test_kid_equals_unbiased_polynomial_mmd_by_hand():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(25, 5)) + 0.3
    mean, _, size = kernel_distance(torch.from_numpy(a), torch.from_numpy(b), subsets=1, subset_size=25)
    # one subset of 25 from each set; with subset_size = len(b), only a's subset is random
    assert size == 25

    def mmd(x, y):
        k = lambda p, q: (p @ q.T / x.shape[1] + 1.0) ** 3  # noqa: E731
        m = len(x)
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())

    full_a, _, _ = kernel_distance(torch.from_numpy(a[:25]), torch.from_numpy(b), subsets=1, subset_size=25)
    assert full_a == pytest.approx(mmd(a[:25], b), rel=1e-9)
    again, _, _ = kernel_distance(torch.from_numpy(a), torch.from_numpy(b), subsets=1, subset_size=25)
    assert again == mean  # fixed seed: reproducible


def test_inception_without_torch_fidelity_names_the_eval_extra():
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if _TORCH_FIDELITY_AVAILABLE:
        pytest.skip("torch-fidelity is installed")
    with pytest.raises(DifftuneError, match=r"\.\[eval\]"):
        load_feature_extractor("inception")


def test_extractor_refusals(tmp_path):
    with pytest.raises(DifftuneError, match="unknown FID feature extractor 'vgg'"):
        load_feature_extractor("vgg")
    with pytest.raises(FileNotFoundError, match="expected config.json"):
        load_feature_extractor(f"clip:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_feature_extractor(f"dino:{tmp_path / 'missing' / 'model'}")
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


# ---------------------------------------------------------------- CLIP

def test_clip_reads_processor_normalisation_from_folder(clip_dir):
    features = ClipImageFeatures.from_pretrained(clip_dir)
    assert features.mean.flatten().tolist() == pytest.approx(PROCESSOR_MEAN)
    assert features.std.flatten().tolist() == pytest.approx(PROCESSOR_STD)
    assert features.image_size == 32 and features.num_features == 24


def test_clip_score_clip_i_clip_t_equal_cosines_by_hand(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    scorer = ClipSimilarity.from_pretrained(clip_dir, batch_size=3)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    images = random_images(4, seed=7)
    reference = random_images(3, seed=8)
    prompts = ["a sks dog", "a sks dog on the beach", "a dog", "a red sks dog on a beach at night"]

    with torch.no_grad():
        tokens = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                    pixel_values=normalised(images, PROCESSOR_MEAN, PROCESSOR_STD))
        cos = (out.logits_per_image / model.logit_scale.exp()).double()
        ref_embeds = model(input_ids=tokens.input_ids[:1],
                           pixel_values=normalised(reference, PROCESSOR_MEAN, PROCESSOR_STD)).image_embeds

    scores = scorer.clip_score(images, prompts, floor=False)
    assert torch.allclose(scores, 100 * cos.diagonal(), atol=1e-4)
    floored = scorer.clip_score(images, prompts)
    assert torch.allclose(floored, (100 * cos.diagonal()).clamp(min=0), atol=1e-4)

    by_hand = F.normalize(out.image_embeds.double(), dim=-1) @ F.normalize(ref_embeds.double(), dim=-1).T
    assert scorer.clip_i(images, reference) == pytest.approx(float(by_hand.mean()), abs=1e-6)

    with torch.no_grad():
        neutral = tokenizer([neutral_prompt(p, "sks", "dog") for p in prompts], padding="max_length",
                            max_length=16, truncation=True, return_tensors="pt")
        out_t = model(input_ids=neutral.input_ids, attention_mask=neutral.attention_mask,
                      pixel_values=normalised(images, PROCESSOR_MEAN, PROCESSOR_STD))
        clip_t = float((100 * out_t.logits_per_image / model.logit_scale.exp()).diagonal().double().mean())
    assert scorer.clip_t(images, prompts, "sks", "dog") == pytest.approx(clip_t, abs=1e-4)
    # PIL images in give the same embeddings as the uint8 tensor
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    assert torch.allclose(scorer.image_embeddings(pil), scorer.image_embeddings(images), atol=1e-12)


def test_neutral_prompt():
    assert neutral_prompt("a sks dog on the beach", "sks", "dog") == "a dog on the beach"
    assert neutral_prompt("a photo of sks on a table", "sks", "dog") == "a photo of dog on a table"
    assert neutral_prompt("a sksdog and asks", "sks", "dog") == "a sksdog and asks"
    # the article follows the class that now comes after it; other articles are left alone
    assert neutral_prompt("a large sks orange star", "sks", "orange star") == "a large orange star"
    assert neutral_prompt("a sks orange star left of a ant", "sks", "orange star") == \
        "an orange star left of a ant"
    assert neutral_prompt("an sks dog", "sks", "dog") == "a dog"


# ---------------------------------------------------------------- DINO

def test_dino_equals_cls_cosines_by_hand(dino_dir):
    from transformers import AutoModel

    scorer = DinoSimilarity.from_pretrained(dino_dir, batch_size=2)
    model = AutoModel.from_pretrained(dino_dir).eval()
    generated, reference = random_images(3, seed=9), random_images(4, seed=10)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    with torch.no_grad():
        cls_gen = model(pixel_values=normalised(generated, mean, std)).last_hidden_state[:, 0]
        cls_ref = model(pixel_values=normalised(reference, mean, std)).last_hidden_state[:, 0]
    by_hand = F.normalize(cls_gen.double(), dim=-1) @ F.normalize(cls_ref.double(), dim=-1).T
    assert scorer.dino(generated, reference) == pytest.approx(float(by_hand.mean()), abs=1e-6)
    assert scorer.dino(generated, generated) < 1.0 + 1e-9


def test_non_square_images_are_centre_cropped(dino_dir):
    features = DinoImageFeatures.from_pretrained(dino_dir, normalize=True)
    wide = random_images(2, seed=11, size=48)[:, :, :32, :]  # (2, 3, 32, 48): shorter side already 32
    centre = wide[:, :, :, 8:40].contiguous()
    assert torch.allclose(features(wide), features(centre), atol=1e-12)


def test_image_batches_never_mix_sizes():
    images = [np.zeros((32, 32, 3), np.uint8)] * 3 + [np.zeros((16, 24, 3), np.uint8)] * 2
    shapes = [tuple(b.shape) for b in image_batches(images, batch_size=2)]
    assert shapes == [(2, 3, 32, 32), (1, 3, 32, 32), (2, 3, 16, 24)]
    with pytest.raises(ValueError, match="no images"):
        extract_features(torch.nn.Identity(), [])


# ---------------------------------------------------------------- VLHI and reporting

def test_vlhi_matches_definition():
    fid = {"lora": 150.0, "sara": 135.0, "full": 130.0}
    clip = {"lora": 28.0, "sara": 27.0, "full": 26.0}
    result = vlhi(fid, clip)
    assert result["full"] == pytest.approx(1.0 + 0.0)
    assert result["lora"] == pytest.approx(0.0 + 1.0)
    assert result["sara"] == pytest.approx((150 - 135) / 20 + (27 - 26) / 2)
    assert vlhi({"a": 1.0, "b": None}, {"a": 2.0, "b": 3.0}) == {"a": 0.0, "b": None}
    with pytest.raises(ValueError, match="different methods"):
        vlhi({"a": 1.0}, {"b": 1.0})


def test_tables_and_plots(tmp_path):
    rows = [{"method": "lora", "params": 797_184, "fid": 12.3456, "note": "a|b"},
            {"method": "sara", "params": 50_000_000, "fid": None}]
    table = markdown_table(rows, ["method", "params", "fid", "note"], headers={"fid": "FID"})
    assert table.splitlines()[0] == "| method | params | FID | note |"
    assert "| lora | 797,184 | 12.346 | a\\|b |" in table and "| sara | 50,000,000 | – | – |" in table
    path = write_csv(tmp_path / "t.csv", rows, ["method", "params", "fid"])
    with open(path) as handle:
        read = list(csv.DictReader(handle))
    assert read[0]["fid"] == "12.3456" and read[1]["fid"] == ""

    plot = scatter_plot([(797_184, 12.3, "lora"), (50_000_000, 10.0, "sara"), (1e5, None, "x")],
                        "trainable parameters", "FID", title="FID vs parameters", log_x=True)
    assert plot.size == (640, 460)
    pixels = np.asarray(plot)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)  # sara's marker
    assert red.sum() > 20
    grid = image_grid([Image.new("RGB", (8, 8), "red")] * 5, columns=2, row_captions=["a", "b", "c"],
                      cell_size=16)
    assert grid.size == (2 * 16 + 3 * 2, 3 * (16 + 16 + 2) + 2)
    assert math.isclose(np.asarray(grid)[20, 10, 0], 255)


def test_plot_labels_spell_out_the_glyphs_the_builtin_font_lacks():
    """Pillow's built-in font draws arrows and the minus sign as empty boxes: a label written with them
    is drawn as the same label spelled out."""
    points = [(0.1, 80.0, "lora"), (0.4, 120.0, "sara")]
    with_glyphs = scatter_plot(points, "drift (1 − cos) ↓", "CLIP ↑", title="FID ↓ vs drift")
    spelled = scatter_plot(points, "drift (1 - cos) (lower is better)", "CLIP (higher is better)",
                           title="FID (lower is better) vs drift")
    boxed = scatter_plot(points, "drift (1 - cos) _", "CLIP _", title="FID _ vs drift")
    assert np.array_equal(np.asarray(with_glyphs), np.asarray(spelled))
    assert not np.array_equal(np.asarray(with_glyphs), np.asarray(boxed))


def test_point_labels_do_not_cover_each_other():
    """Labels of points close together are moved apart; a label with room stays right of and above it."""
    from difftune.metrics.reporting import place_labels

    bounds = (0, 0, 400, 300)
    anchors = [(100, 150), (102, 151), (101, 149), (300, 50)]
    sizes = [(60, 14), (60, 14), (60, 14), (40, 14)]
    corners = place_labels(anchors, sizes, bounds)
    assert corners[0] == (108, 134) and corners[3] == (308, 34)
    boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes, strict=True)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert all(x >= 0 and x + w <= 400 and y >= 0 and y + h <= 300
               for (x, y), (w, h) in zip(corners, sizes, strict=True))
    marker = (150, 130, 160, 140)  # a point's marker where the first label would go
    (x, y), = place_labels(anchors[:1], sizes[:1], bounds, obstacles=[marker])
    assert x + 60 <= 150 or y + 14 <= 130 or y >= 140


def test_reports_name_the_shipped_clip_by_its_place_in_the_project_not_this_install():
    from difftune.metrics.cli import EMBEDDED_CLIP
    from difftune.metrics.subject import model_label

    assert EMBEDDED_CLIP.is_absolute()
    assert model_label(str(EMBEDDED_CLIP)) == "assets/embedded_model/world_clip"
    assert model_label(f"clip:{EMBEDDED_CLIP}") == "clip:assets/embedded_model/world_clip"
    for elsewhere in ("openai/clip-vit-large-patch14", "/data/models/clip", "clip:/data/models/clip"):
        assert model_label(elsewhere) == elsewhere


def test_fid_note_names_the_shipped_clip_by_its_place_in_the_project():
    from difftune.metrics.cli import EMBEDDED_CLIP
    from difftune.metrics.subject import fid_note

    fid = {"extractor": f"clip:{EMBEDDED_CLIP}", "resize": "shorter side to 64", "real_count": 100,
           "generated_count": 20}
    note = fid_note([{"fid": fid}, {"fid": dict(fid)}, {"fid": None}])
    assert note == ("FID/KID: clip:assets/embedded_model/world_clip, shorter side to 64, "
                    "100 reference / 20 generated images.")


def test_models_note_names_the_shipped_clip_by_its_place_and_says_when_dino_is_missing():
    from difftune.metrics.cli import EMBEDDED_CLIP
    from difftune.metrics.subject import models_note

    assert models_note(f"clip:{EMBEDDED_CLIP}", None) == (
        "CLIP: clip:assets/embedded_model/world_clip; DINO: not computed.")
    assert models_note("openai/clip-vit-base-patch32", "facebook/dino-vits16", "not computed (no model)") == (
        "CLIP: openai/clip-vit-base-patch32; DINO: facebook/dino-vits16.")
    assert models_note("clip", None, "not computed (no model)").endswith("DINO: not computed (no model).")


def test_table_numbers_keep_small_values_visible():
    from difftune.metrics.reporting import format_value

    assert format_value(0.0003) == "0.0003"  # a learning rate, not "0.000"
    assert format_value(0.01) == "0.010"
    assert format_value(-2.5e-5) == "-2.5e-05"
    assert format_value(0.0) == "0.000"
    assert format_value(12345.6) == "12,346"
    assert format_value(7) == "7" and format_value(None) == "–"
