"""difftune.training.prior on its own: which class images are missing, and that topping them up gives
the same image k whatever the batch size, the process count or the earlier runs."""

import threading

import numpy as np
import torch
from PIL import Image

from difftune.training.prior import ensure_class_images, existing_images, missing_image_numbers


class ColourPipeline:
    """Draws a flat image whose colour is the first three values of its generator: image k depends
    on its generator only. Records the batch size of every call."""

    def __init__(self):
        self.batches = []

    def __call__(self, prompt, generator, height, width, num_inference_steps):
        assert len(prompt) == len(generator)
        self.batches.append(len(prompt))
        colours = [tuple(torch.randint(0, 256, (3,), generator=g).tolist()) for g in generator]
        return type("Output", (), {"images": [Image.new("RGB", (width, height), c) for c in colours]})


class Process:
    """What ensure_class_images uses of an Accelerator: this process's rank among ``world``, which
    run as threads meeting at ``barrier``."""

    def __init__(self, rank, world, barrier):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.wait_for_everyone = barrier.wait


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)).copy() for p in existing_images(folder)}


def test_missing_numbers_fill_the_gaps_and_count_every_image_file(tmp_path):
    for name in ("class-00000.png", "class-00002.png", "mine.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in existing_images(tmp_path)] == ["class-00000.png", "class-00002.png", "mine.jpg"]
    assert missing_image_numbers(tmp_path, 6) == [1, 3, 4]  # 3 images there, 3 missing, no name reused
    assert missing_image_numbers(tmp_path, 3) == []
    assert missing_image_numbers(tmp_path, 2) == []  # more than asked: nothing generated, nothing removed
    assert missing_image_numbers(tmp_path / "absent", 2) == [0, 1]


def test_image_k_does_not_depend_on_batch_size_processes_or_top_ups(tmp_path):
    pipe = ColourPipeline()
    made = ensure_class_images(pipe, tmp_path / "one", "a dog", 5, seed=7, resolution=8, batch_size=2)
    assert made == 5 and pipe.batches == [2, 2, 1]
    reference = pixels(tmp_path / "one")
    assert sorted(reference) == [f"class-0000{k}.png" for k in range(5)]
    assert len({image.tobytes() for image in reference.values()}) == 5  # five different draws

    # two processes at once, each its share (0, 2, 4 and 1, 3), batch size 3
    barrier, made = threading.Barrier(2, timeout=60), {}

    def process(rank):
        made[rank] = ensure_class_images(ColourPipeline(), tmp_path / "two", "a dog", 5, seed=7, resolution=8,
                                         batch_size=3, accelerator=Process(rank, 2, barrier))

    threads = [threading.Thread(target=process, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert made == {0: 3, 1: 2}
    two = pixels(tmp_path / "two")
    assert two.keys() == reference.keys()
    assert all(np.array_equal(two[name], reference[name]) for name in reference)

    # a run killed after image 2: the next one draws only what is missing, the same images
    for name in ("class-00001.png", "class-00003.png", "class-00004.png"):
        (tmp_path / "one" / name).unlink()
    pipe = ColourPipeline()
    assert ensure_class_images(pipe, tmp_path / "one", "a dog", 5, seed=7, resolution=8, batch_size=4) == 3
    assert pipe.batches == [3]
    again = pixels(tmp_path / "one")
    assert all(np.array_equal(again[name], reference[name]) for name in reference)
    assert ensure_class_images(ColourPipeline(), tmp_path / "one", "a dog", 5, seed=7, resolution=8) == 0

    other_seed = tmp_path / "other"
    ensure_class_images(ColourPipeline(), other_seed, "a dog", 1, seed=8, resolution=8)
    assert not np.array_equal(pixels(other_seed)["class-00000.png"], reference["class-00000.png"])


def test_generation_leaves_the_global_random_state_alone(tmp_path):
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    ensure_class_images(ColourPipeline(), tmp_path, "a dog", 3, seed=1, resolution=8)
    assert torch.equal(torch.rand(4), expected)
