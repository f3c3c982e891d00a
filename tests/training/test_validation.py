"""difftune.sampling on its own: one generate_images with one seeding rule for the
evaluation and the trainers' samples, grids, and atomic PNG writes."""

import numpy as np
import pytest
import torch
from PIL import Image

from difftune import sampling
from difftune.sampling import (
    GenerationSettings,
    generate_image_sets,
    generate_images,
    image_grid,
    image_seed,
    save_grid,
)
from difftune.training.settings import ValidationSettings


class RecordingPipeline:
    """Draws flat images coloured by their generator; records every call's keyword arguments."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []
        self.progress = None

    def set_progress_bar_config(self, disable):
        self.progress = not disable

    def __call__(self, generator, height, width, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"generator_seeds": seeds, "height": height, "width": width, **kwargs})
        colours = [tuple(torch.randint(0, 256, (3,), generator=g).tolist()) for g in generator]
        torch.rand(1)  # a pipeline may draw from the global generator too
        images = [Image.new("RGB", (width or 4, height or 4), c) for c in colours]
        return type("Output", (), {"images": images})


def test_image_k_of_prompt_p_has_its_own_seed_whatever_the_batching():
    settings = GenerationSettings(images_per_prompt=3, seed=2, num_inference_steps=5, guidance_scale=None,
                                  height=8, width=8, batch_size=2)
    pipe = RecordingPipeline()
    images = generate_images(pipe, ["a", "b"], settings, show_progress=False)
    assert [len(group) for group in images] == [3, 3]
    assert [len(call["prompt"]) for call in pipe.calls] == [2, 2, 2]
    assert [call["prompt"] for call in pipe.calls] == [["a", "a"], ["a", "b"], ["b", "b"]]
    seeds = [s for call in pipe.calls for s in call["generator_seeds"]]
    assert seeds == [2 * 1_000_003 + p * 3 + k for p in range(2) for k in range(3)]
    assert seeds == [image_seed(settings, p, k) for p in range(2) for k in range(3)]
    assert all("guidance_scale" not in call for call in pipe.calls)  # None: the pipeline's own
    assert pipe.calls[0]["num_inference_steps"] == 5 and pipe.progress is False

    unbatched = GenerationSettings(images_per_prompt=3, seed=2, guidance_scale=7.0, height=8, width=8,
                                   batch_size=1)
    one_by_one = generate_images(RecordingPipeline(), ["a", "b"], unbatched, show_progress=False)
    for group, other in zip(images, one_by_one, strict=True):
        assert [np.asarray(i).tolist() for i in group] == [np.asarray(i).tolist() for i in other]


def test_prompt_lists_drawn_together_fill_batches_and_keep_each_lists_seeds():
    settings = GenerationSettings(images_per_prompt=2, seed=1, guidance_scale=None, height=8, width=8,
                                  batch_size=3)
    pipe = RecordingPipeline()
    prompts, classes = ["a sks x", "b sks x", "c sks x"], ["a x", "b x", "c x"]
    together = generate_image_sets(pipe, [prompts, classes], settings, show_progress=False)
    # 12 images in 4 full calls (alone: 2 calls of 3 each list); one call spans both lists
    assert [call["prompt"] for call in pipe.calls] == [
        ["a sks x", "a sks x", "b sks x"], ["b sks x", "c sks x", "c sks x"],
        ["a x", "a x", "b x"], ["b x", "c x", "c x"]]
    seeds = [s for call in pipe.calls for s in call["generator_seeds"]]
    one_list = [image_seed(settings, p, k) for p in range(3) for k in range(2)]
    assert seeds == one_list + one_list  # image k of prompt p: the same noise in both lists
    for drawn, alone_prompts in zip(together, (prompts, classes), strict=True):
        alone = generate_images(RecordingPipeline(), alone_prompts, settings, show_progress=False)
        assert [[np.asarray(i).tolist() for i in g] for g in drawn] == \
            [[np.asarray(i).tolist() for i in g] for g in alone]
    odd = RecordingPipeline()
    generate_image_sets(odd, [["a"], ["b", "c"]], GenerationSettings(1, guidance_scale=None, batch_size=2),
                        show_progress=False)
    assert [call["prompt"] for call in odd.calls] == [["a", "b"], ["c"]]
    assert [call["generator_seeds"] for call in odd.calls] == [[0, 0], [1]]


def test_precomputed_embeddings_are_drawn_one_image_per_call():
    embeddings = {"prompt_embeds": torch.zeros(1, 2, 3)}
    pipe = RecordingPipeline()
    settings = GenerationSettings(images_per_prompt=3, seed=0, guidance_scale=4.0, batch_size=8)
    images = generate_images(pipe, [embeddings], settings, show_progress=False)
    assert len(images[0]) == 3 and len(pipe.calls) == 3
    assert all(call["prompt_embeds"] is embeddings["prompt_embeds"] and "prompt" not in call
               for call in pipe.calls)
    assert all(call["guidance_scale"] == 4.0 for call in pipe.calls)


def test_sampling_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate_images(RecordingPipeline(), ["a"], GenerationSettings(images_per_prompt=2), show_progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_the_trainer_samples_square_images_with_its_flags():
    flags = ValidationSettings(validation_prompt="p", num_validation_images=3, validation_steps=10,
                               validation_inference_steps=7, validation_guidance_scale=None)
    assert flags.generation(seed=5, resolution=64) == GenerationSettings(
        images_per_prompt=3, seed=5, num_inference_steps=7, guidance_scale=None, height=64, width=64,
        batch_size=1)


def flat(colour, size=(4, 3)):
    return Image.new("RGB", size, colour)


def test_grid_places_images_in_rows_and_fills_the_rest_white():
    colours = [(10 * i, 0, 0) for i in range(5)]
    grid = image_grid([flat(c) for c in colours])  # near-square: 3 columns, 2 rows
    assert grid.size == (12, 6)
    array = np.asarray(grid)
    for index, colour in enumerate(colours):
        x, y = (index % 3) * 4, (index // 3) * 3
        assert (array[y:y + 3, x:x + 4] == colour).all()
    assert (array[3:, 8:] == 255).all()
    assert image_grid([flat(c) for c in colours], columns=5).size == (20, 3)


def test_save_grid_writes_the_grid_and_nothing_when_the_writer_fails(tmp_path, monkeypatch):
    images = [flat((0, 50, 0)), flat((0, 0, 50))]
    path = save_grid(images, tmp_path / "sub" / "grid.png", columns=1)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image_grid(images, 1)))
    before = path.read_bytes()

    def half_written(self, fp, format=None, **kwargs):
        with open(fp, "wb") as file:
            file.write(b"\x89PNG half")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(sampling.Image.Image, "save", half_written)
    with pytest.raises(RuntimeError, match="killed while writing"):
        save_grid([flat((1, 2, 3))], path)
    with pytest.raises(RuntimeError):
        save_grid([flat((1, 2, 3))], tmp_path / "sub" / "new.png")
    assert path.read_bytes() == before  # the old grid is intact
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["grid.png"]  # no partial or temp file


@pytest.mark.parametrize("offload", [False, True])
def test_final_samples_follow_offload(monkeypatch, tmp_path, offload):
    """--offload: the fresh pipeline of the final samples is loaded in CPU memory and handed to diffusers'
    model offload for the training device; without it, it is loaded straight onto the device."""
    import contextlib
    from types import SimpleNamespace

    from difftune.training import session

    loaded, pipeline = [], RecordingPipeline()
    pipeline.offloaded_to = None
    pipeline.enable_model_cpu_offload = lambda device: setattr(pipeline, "offloaded_to", device)

    def load_base_pipeline(base, dtype, device, adapter_path, base_adapters=()):
        loaded.append((device, adapter_path))
        return pipeline

    monkeypatch.setattr(session.loop, "load_base_pipeline", load_base_pipeline)
    accelerator = SimpleNamespace(device=torch.device("meta"), autocast=contextlib.nullcontext)
    written = session.sample_saved_adapter(
        None, torch.float32, accelerator, tmp_path / "adapter.safetensors", ["a prompt"],
        ValidationSettings(num_validation_images=2, validation_inference_steps=1), seed=0, resolution=8,
        step=3, save=lambda images, folder, tag, step: [f"{tag}-{step}"], offload=offload)
    assert written == ["final-3"] and len(pipeline.calls) == 2  # two images of one prompt
    expected_device = torch.device("cpu") if offload else accelerator.device
    assert loaded == [(expected_device, tmp_path / "adapter.safetensors")]
    assert pipeline.offloaded_to == (accelerator.device if offload else None)
