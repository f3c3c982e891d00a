"""Shared fixtures. Tests run offline: no hub, tiny random models built from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn

from difftune.families import FAMILIES, LossOptions, NoisyInput, TrainingBatch, training_family
from difftune.families.tiny import TINY_SAMPLE_SIZE

# Under pytest-xdist (`-n auto`, as CI runs) each worker gets one core: one thread in the worker and in
# every process a test starts, as two threads beside other work are many times slower than one.
PARALLEL_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if PARALLEL_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if PARALLEL_WORKER else min(2, torch.get_num_threads()))


class TinyNet(torch.nn.Module):
    """Two attention-named linear layers (to_q, to_k): enough to attach, train and save an adapter."""

    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(8, 8)
        self.to_k = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.to_k(torch.relu(self.to_q(x)))


# How every registered adapter method is set up on the tiny models, one row per method and one
# (targets, options) entry per use: "contract" (attach, merge, scale, remove, gradients on every
# family), "files" (round trips through adapter files; several entries widen them), "fuzz" (a small
# file to damage), "text_encoder" (options on the CLIP text encoders). A registered method without a
# row fails test_every_registered_method_has_test_cases; `method_cases` parametrises over the registry.
METHOD_CASES: dict[str, dict[str, list[tuple[object, dict]]]] = {
    "lora": {"contract": [("attn", {"rank": 4})],
             "files": [("attn", {"rank": 4, "alpha": 8.0}), ("all", {"rank": 2})],
             "fuzz": [("attn", {"rank": 2, "alpha": 4.0})],
             "text_encoder": [(None, {"rank": 4, "alpha": 8.0})]},
    # tiny random models have other magnitudes than SD: select by budget
    "sara": {"contract": [("all", {"budget": 0.05})],
             "files": [("all", {"budget": 0.05}), ("attn", {"budget": 3000, "include_bias_norm": True})],
             "fuzz": [("all", {"budget": 0.02})],
             "text_encoder": [(None, {"budget": 0.05})]},
    "svfit": {"contract": [("attn", {})],
              "files": [("attn", {}), ("all", {"rank": 4})],
              "fuzz": [("attn", {"rank": 2})],
              "text_encoder": [(None, {})]},
    "tlora": {"contract": [("attn", {})],
              "files": [("attn", {}), ("all", {"residual": "lora", "rank": 2, "transform_rank": 1})],
              "fuzz": [("attn", {})],
              "text_encoder": [(None, {})]},
    # every peft type and its own injection as reference: tests/tuners/test_peft.py
    "peft": {"contract": [("attn", {"type": "loha", "rank": 4})],
             "files": [("attn", {"type": "oft"}), ("all", {"type": "lokr", "rank": 4})],
             "fuzz": [("attn", {"type": "loha", "rank": 2})],
             "text_encoder": [(None, {"type": "loha", "rank": 4})]},
    "full_ft": {"contract": [("attn", {})],
                "files": [("attn", {}), ("all", {"alpha": 0.5})],
                "fuzz": [("attn", {})],
                "text_encoder": [(None, {})]},
}


# The adversarial tests (fuzz, kills, checkpoint damage) run a seeded sample in the suite and their whole
# campaign under benchmarks/reliability.py, which sets DIFFTUNE_FULL_CAMPAIGN=1 (the documented counts).
FULL_CAMPAIGN = os.environ.get("DIFFTUNE_FULL_CAMPAIGN") == "1"


def campaign_size(full: int, sample: int) -> int:
    """How many cases an adversarial test runs: ``full`` in the reliability campaign, else ``sample``."""
    return full if FULL_CAMPAIGN else sample


def method_cases(use: str, first_only: bool = False) -> list:
    """``pytest.param(method, targets, options)`` of every registered method for ``use``."""
    from difftune.tuners import METHODS

    cases = []
    for method in METHODS:
        entries = METHOD_CASES.get(method, {}).get(use, [])
        for targets, options in entries[:1] if first_only else entries:
            name = method if first_only or len(entries) == 1 else f"{method}-{targets}"
            cases.append(pytest.param(method, targets, options, id=name))
    return cases


def build(family: str, seed: int = 0):
    """The tiny built-in pipeline of a registered family."""
    return FAMILIES[family].build_tiny(seed)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    """Every registered model family, by name: a new family joins the contract tests by registering."""
    return request.param


TINY_LATENT_FRAMES = 2  # latent frames of a video family's tiny clips (5 frames)
TINY_NUM_FRAMES = 5


def tiny_latents(family, batch: int = 1, generator=None, size: int = TINY_SAMPLE_SIZE) -> torch.Tensor:
    """Random latents of a bound family's tiny model: (B, C, size, size), or a few latent frames for a
    video family (B, C, frames, size, size)."""
    channels = family.latent_channels(family.denoiser.config)
    frames = (TINY_LATENT_FRAMES,) if family.video else ()
    return torch.randn(batch, channels, *frames, size, size, generator=generator)


def denoiser_inputs(pipe, batch: int = 1, seed: int = 0) -> dict:
    """Deterministic inputs for one denoiser forward call of any family's tiny model: random latents at
    timestep 500 of 1000, a prompt's embeddings, all laid out by the family as training does."""
    family = training_family(pipe, torch.device("cpu"), LossOptions())
    latents = tiny_latents(family, batch, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        conditioning = family.encode_prompts(["a photo of a sks dog"] * batch)
    noisy = NoisyInput(latents, torch.full((batch,), 500), latents, torch.ones(batch))
    size = torch.tensor([[64, 64]] * batch)
    sizes = TrainingBatch(None, conditioning, size, torch.zeros_like(size), None, [])
    return family.model_kwargs(noisy, sizes)


def forward(model, inputs: dict) -> torch.Tensor:
    """The denoiser's output on ``inputs`` as one tensor (Z-Image's transformer returns a list)."""
    output = model(**inputs, return_dict=False)[0]
    return torch.stack(list(output)) if isinstance(output, (list, tuple)) else output


def denoise(pipe, inputs: dict) -> torch.Tensor:
    from difftune.api import find_denoiser

    model, _ = find_denoiser(pipe)
    with torch.no_grad():
        return forward(model, inputs)


def generate(pipe, seed: int = 0, prompt: str = "a photo of a sks dog", **kwargs):
    """Two sampler steps at 64x64 as a numpy array: images, or a video family's frames (5 per clip)."""
    from difftune.families import family_of

    gen = torch.Generator().manual_seed(seed)
    video = family_of(pipe).video
    output = pipe(prompt=prompt, num_inference_steps=2, height=64, width=64, generator=gen, output_type="np",
                  **({"num_frames": TINY_NUM_FRAMES} if video else {}), **kwargs)
    return output.frames if video else output.images


def randomize_adapter(model, std: float = 0.05, seed: int = 1) -> None:
    """Give every trainable adapter parameter a random value (a stand-in for training)."""
    import difftune

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in difftune.trainable_parameters(model):
            param.add_(torch.randn(param.shape, generator=gen) * std)


# ---------------------------------------------------------------- tiny metric models (saved, loaded by path)

TINY_CLIP_MEAN = [0.5, 0.4, 0.3]
TINY_CLIP_STD = [0.2, 0.25, 0.3]


def save_tiny_clip(directory, seed: int = 0):
    """A random 2-layer CLIPModel (32-px images, 24-d embeddings) with tokenizer and processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from difftune.families.tiny import offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer(words=("dog", "sks", "beach"), model_max_length=16)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=TINY_CLIP_MEAN, image_std=TINY_CLIP_STD)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def save_tiny_vision_model(directory, kind: str = "dinov2", seed: int = 1):
    """A random 2-layer Dinov2Model or ViTModel (32-px images, 32-d CLS), saved without a processor."""
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
             "image_size": 32, "patch_size": 8}
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**sizes)) if kind == "dinov2" else ViTModel(ViTConfig(**sizes))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory):
    return save_tiny_vision_model(tmp_path_factory.mktemp("tiny_dino"), "dinov2")


# --- the commands (difftune/commands/) and the checkout's scripts ------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the checkout's wrapper of `difftune train-subject`, for the tests that run it as a process
TRAIN_SUBJECT = os.path.join(ROOT, "train_scripts", "train_subject.py")


def command_module(name: str):
    """A command's module, ``difftune.commands.<name>`` (e.g. "evaluate_subject"), for its functions."""
    import importlib

    return importlib.import_module(f"difftune.commands.{name}")


def load_script(path: str):
    """A script of the repository (``path`` relative to its root, e.g. "eval/benchmark.py") as a module."""
    import importlib.util

    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_subject_images(folder, count: int = 3, size=(72, 64), seed: int = 0):
    """A few small images of one made-up "subject": a coloured disc on a varying background."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    for i in range(count):
        background = rng.integers(0, 255, 3)
        image = np.empty((size[1], size[0], 3), dtype=np.uint8)
        image[:] = background
        cx, cy = size[0] // 2 + rng.integers(-8, 8), size[1] // 2 + rng.integers(-8, 8)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < 18 ** 2] = (230, 40, 40)
        Image.fromarray(image).save(os.path.join(folder, f"subject_{i}.png"))
    return folder


def train_script_runner(command: str):
    """``run(*flags)``: a trainer command's main() in this process (fast), accelerate state reset after.

    ``command`` names its module (`command_module`); ``run.module`` is that module, for monkeypatching
    its names.
    """
    from accelerate.state import AcceleratorState, GradientState

    module = command_module(command)

    def run(*flags):
        try:
            return module.main([str(flag) for flag in flags])
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    run.module = module
    return run


def interrupt_after_first_checkpoint(monkeypatch):
    """Make a trainer die right after it has written its first checkpoint."""
    from difftune.training import checkpointing

    original = checkpointing.save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)


@pytest.fixture(scope="session")
def train_subject():
    return train_script_runner("train_subject")


@pytest.fixture(scope="session")
def train_text_to_image():
    return train_script_runner("train_text_to_image")


def make_style_images(folder, sizes=((64, 64), (96, 64), (64, 96), (80, 64), (64, 64), (128, 64)),
                      prefix: str = "", seed: int = 0):
    """A made-up "style": discs on stripes, one image per (width, height) in ``sizes``, captioned in
    metadata.jsonl ("a red disc 0", ...)."""
    import json

    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, (width, height) in enumerate(sizes):
        yy, xx = np.mgrid[0:height, 0:width]
        image = np.where(((xx // 6) % 2)[..., None], rng.integers(0, 255, 3), rng.integers(0, 255, 3))
        disc = (xx - width // 2) ** 2 + (yy - height // 2) ** 2 < (min(width, height) // 3) ** 2
        image[disc] = (230, 40, 40)
        Image.fromarray(image.astype(np.uint8)).save(os.path.join(folder, f"{prefix}{i}.png"))
        rows.append({"file_name": f"{prefix}{i}.png", "text": f"a red disc {i}"})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


@pytest.fixture
def style_dir(tmp_path):
    return make_style_images(tmp_path / "style")


@pytest.fixture
def subject_dir(tmp_path):
    return make_subject_images(tmp_path / "subject")


def single_layer_model(kind: str, in_dim: int, out_dim: int, tokens: int, size: int, stride: int = 1):
    """One layer in an ``nn.Sequential`` (so its name is "0") and an input batch of 2: a Linear on
    ``tokens`` tokens, or a 3×3 / 1×1 Conv2d (``kind`` conv3x3 / conv1x1) on size×size maps."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_dim, out_dim)), torch.randn(2, tokens, in_dim)
    k = 3 if kind == "conv3x3" else 1
    return (nn.Sequential(nn.Conv2d(in_dim, out_dim, k, stride=stride, padding=k // 2)),
            torch.randn(2, in_dim, size, size))


def moving_square(count: int, size=(24, 20), seed: int = 0):
    """``count`` RGB frames of a red square moving right over a coloured background."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    background, top = rng.integers(0, 200, 3), int(rng.integers(2, size[1] - 10))
    frames = []
    for k in range(count):
        array = np.empty((size[1], size[0], 3), dtype=np.uint8)
        array[:] = background
        array[top:top + 8, 2 + k:10 + k] = (230, 40, 40)
        frames.append(Image.fromarray(array))
    return frames


def make_clips(folder, frames: int = 9):
    """A training folder of every clip kind: an mp4 (PyAV), an animated WebP, a folder of frames and a
    still image, with a sidecar caption for the mp4."""
    from difftune.video.clips import save_mp4, save_webp

    os.makedirs(folder, exist_ok=True)
    save_mp4(moving_square(frames, seed=0), os.path.join(folder, "a.mp4"), fps=8)
    save_webp(moving_square(frames + 2, seed=1), os.path.join(folder, "b.webp"), fps=8)
    os.makedirs(os.path.join(folder, "c"), exist_ok=True)
    for index, frame in enumerate(moving_square(frames, seed=2)):
        frame.save(os.path.join(folder, "c", f"{index:03d}.png"))
    moving_square(1, seed=3)[0].save(os.path.join(folder, "d.png"))
    with open(os.path.join(folder, "a.txt"), "w") as handle:
        handle.write("a sks square sliding")
    return folder


@pytest.fixture
def clip_dir(tmp_path):
    return make_clips(tmp_path / "clips")


def example_generators(count: int, seed: int = 0) -> list:
    """One seeded torch generator per example, as the trainers give each example its own."""
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def die_after_first_checkpoint(monkeypatch) -> None:
    """Make a trainer stop (KeyboardInterrupt) right after it has written its first checkpoint."""
    from difftune.training import checkpointing

    original = checkpointing.save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)
