"""Pretraining of the embedded model on the procedural world: CLIP, then VAE, then UNet.

The VAE has two stages: the joint autoencoder, then its decoder alone on the frozen
encoder's latents (the latent space the UNet learns is fixed by the encoder, so a
sharper decoder improves every generated image without touching the UNet).

Each stage is a function that trains one model from scratch with a tqdm bar and writes
an atomic checkpoint (temp file, then ``os.replace``) every few steps; with
``resume=True`` it continues from the last checkpoint. A batch is a pure function of
(seed, stage, step), so an interrupted and resumed run takes exactly the steps of an
uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io import atomic_write, write_json, write_text
from .clip_model import (
    AttributeHeads,
    WorldClipSize,
    accuracy_against,
    build_world_clip,
    build_world_tokenizer,
    classify_color_shape,
    color_shape_prompts,
    contrastive_loss,
    hard_negatives,
    load_world_clip,
    save_world_clip,
    single_object_scenes,
    tokenize,
    whiten_patch_embedding,
    zero_shot_accuracy,
)
from .scenes import Scene, render_scene, to_tensor, world_scene

STAGES = ("clip", "clip_image", "vae", "vae_decoder", "unet")
_STAGE_SALT = {"clip": 1, "vae": 2, "unet": 3, "clip_image": 4, "vae_decoder": 5}


@dataclass
class StageSettings:
    """Optimisation settings of one stage. ``schedule``: "cosine" (to 10%) or "constant".

    ``schedule_steps`` is the cosine's horizon when it differs from ``steps``: a stage can
    stop part-way through its schedule (the joint CLIP stage does, see ``PretrainConfig``).
    """

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 200
    log_every: int = 25
    schedule_steps: int | None = None


@dataclass
class PretrainConfig:
    """Everything that defines the three models and how they are trained."""

    train_scenes: int = 50_000
    seed: int = 0
    clip_size: WorldClipSize = field(default_factory=WorldClipSize)
    # The joint stage stops halfway through its cosine: its text tower is then final (the
    # UNet is trained on it) and only the image side goes on learning, in ``clip_image``.
    clip: StageSettings = field(default_factory=lambda: StageSettings(
        steps=1000, batch_size=128, learning_rate=1e-3, warmup_steps=100, weight_decay=0.1,
        schedule_steps=2000))
    caption_drop_probability: float = 0.3  # each optional caption attribute, all stages
    clip_hard_negatives: int = 1  # one-detail-wrong captions per image (0, 1 or 2)
    clip_class_prompts: bool = True  # every batch also scores all "a {colour} {shape}" prompts
    clip_attribute_loss_weight: float = 1.0  # auxiliary multi-label attribute probes on the image tower
    # Image side only, text tower locked: the ViT needs thousands of steps to tell shapes apart.
    # A constant rate, so that a longer run is the same run continued. Held-out shape accuracy
    # sits at 30-50% for 4000 steps, then jumps (84% at 6000, 96% at 7500).
    clip_image: StageSettings = field(default_factory=lambda: StageSettings(
        steps=8000, batch_size=64, learning_rate=1e-3, warmup_steps=100, weight_decay=0.1,
        schedule="constant", checkpoint_every=500))
    vae_channels: tuple[int, ...] = (16, 32, 64)  # three levels: 64×64 → 16×16 latents
    vae_norm_groups: int = 16
    latent_channels: int = 4
    kl_weight: float = 1e-6
    vae: StageSettings = field(default_factory=lambda: StageSettings(
        steps=2000, batch_size=32, learning_rate=1e-3, warmup_steps=100))
    # Decoder only, encoder frozen. After the joint stage the world CLIP recognises only 58% of
    # reconstructed shapes and 71% of colours (blur, halos, colour shifts). Decoder steps raise
    # that (200 held-out scenes, shape / colour): 3000 → 71% / 85%, 6000 → 80% / 95%,
    # 9000 → 82% / 96%, 15000 → 86% / 96%, 24000 → 89% / 98%, at a third of a joint step's
    # cost; still rising slowly.
    vae_decoder: StageSettings = field(default_factory=lambda: StageSettings(
        steps=24000, batch_size=32, learning_rate=5e-4, warmup_steps=100, schedule="constant"))
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_norm_groups: int = 32
    unet_attention_heads: int = 8
    unet: StageSettings = field(default_factory=lambda: StageSettings(
        steps=32000, batch_size=32, learning_rate=5e-4, warmup_steps=200, schedule="constant"))
    empty_prompt_probability: float = 0.1  # caption dropout for classifier-free guidance
    snr_gamma: float | None = 5.0  # Min-SNR-γ weighting of the ε loss; None = plain MSE
    ema_decay: float = 0.999
    eval_scenes: int = 1000

    @classmethod
    def tiny(cls, steps: int = 4) -> PretrainConfig:
        """Minutes-free sizes for tests: every code path, none of the quality."""
        def stage(**extra) -> StageSettings:
            return StageSettings(steps=steps, batch_size=4, learning_rate=1e-3, warmup_steps=2,
                                 checkpoint_every=2, log_every=1, **extra)
        return cls(
            train_scenes=16,
            clip_size=WorldClipSize(text_width=32, text_layers=1, vision_width=32, vision_layers=1,
                                    heads=2, patch_size=16, projection_dim=16),
            clip=stage(), clip_image=stage(), vae_channels=(8, 16, 16), vae_norm_groups=8, vae=stage(),
            vae_decoder=stage(schedule="constant"),
            unet_channels=(32, 32, 32), unet_norm_groups=8, unet_attention_heads=2,
            unet=stage(schedule="constant"), eval_scenes=8,
        )

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- data

class TrainingData:
    """Pre-rendered training scenes; batch ``step`` of a stage is a pure function of its seed."""

    def __init__(self, scenes: list[Scene], images: np.ndarray, seed: int = 0,
                 caption_drop_probability: float = 0.3) -> None:
        if len(scenes) != len(images):
            raise ValueError(f"{len(scenes)} scenes but {len(images)} images")
        self.scenes = scenes
        self.images = images
        self.seed = seed
        self.caption_drop_probability = caption_drop_probability

    def __len__(self) -> int:
        return len(self.scenes)

    def rng(self, stage: str, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STAGE_SALT[stage], step])

    def torch_generator(self, stage: str, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.rng(stage, step).integers(2**62)))

    def batch(self, stage: str, step: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
        """(indices, captions with optional attributes randomly dropped)."""
        rng = self.rng(stage, step)
        indices = rng.integers(len(self), size=batch_size)
        captions = [self.scenes[i].caption(rng, self.caption_drop_probability) for i in indices]
        return indices, captions

    def pixels(self, indices: np.ndarray) -> torch.Tensor:
        return to_tensor(self.images[indices])


def load_training_data(cache_dir: Path, config: PretrainConfig, progress: bool = True) -> TrainingData:
    """Render the first ``train_scenes`` training scenes once and cache them as .npy."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"train_{config.train_scenes}.npy"
    scenes = [world_scene("train", i) for i in range(config.train_scenes)]
    if path.is_file():
        images = np.load(path)
    else:
        images = np.empty((len(scenes), 64, 64, 3), dtype=np.uint8)
        for i, scene in enumerate(tqdm(scenes, desc="render train scenes", unit="scene",
                                       disable=not progress, mininterval=5)):
            images[i] = render_scene(scene)
        def save_array(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a handle: np.save would add ".npy" to a path
                np.save(handle, images)

        atomic_write(path, save_array)
    return TrainingData(scenes, images, config.seed, config.caption_drop_probability)


# ---------------------------------------------------------------- checkpoints and the loop

def learning_rate_factor(step: int, settings: StageSettings) -> float:
    warmup = min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    if settings.schedule == "constant":
        return warmup
    if settings.schedule == "cosine":
        progress = min(step / max(settings.schedule_steps or settings.steps, 1), 1.0)
        return warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule '{settings.schedule}' (cosine or constant)")


class ExponentialMovingAverage:
    """EMA of parameters with the usual warm-up, min(decay, (1 + n) / (10 + n))."""

    def __init__(self, parameters: Iterable[nn.Parameter], decay: float) -> None:
        self.parameters = list(parameters)
        self.shadow = [p.detach().clone() for p in self.parameters]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow, self.parameters, strict=True):
            shadow.lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [s.clone() for s in state["shadow"]]
        self.updates = state["updates"]
        self.decay = state["decay"]


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only, as usual for transformers and UNets."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def run_stage(name: str, model: nn.Module, settings: StageSettings,
              loss_at_step: Callable[[int], torch.Tensor], stage_dir: Path, resume: bool,
              ema: ExponentialMovingAverage | None = None, progress: bool = True,
              stop_after: int | None = None, evaluate: Callable[[], dict] | None = None) -> dict:
    """The shared optimisation loop: AdamW, warm-up + schedule, clipping, checkpoints, resume.

    Returns the stage record (steps done, loss log, cumulative wall time, and the results
    of ``evaluate`` run at every checkpoint, if given). ``stop_after``
    ends the call early at that step (after checkpointing) as if the process had died:
    for tests of resume.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = stage_dir / "checkpoint.pt"
    optimizer = torch.optim.AdamW(_decay_groups(model, settings.weight_decay), lr=settings.learning_rate,
                                  betas=(0.9, 0.98 if name.startswith("clip") else 0.999))
    record = {"stage": name, "step": 0, "wall_seconds": 0.0, "log": [], "threads": torch.get_num_threads()}
    if checkpoint_path.is_file():
        if not resume:
            raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue it, "
                                  "or choose another --output_dir")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        record = state["record"]

    def checkpoint() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "record": record}
        if ema is not None:
            state["ema"] = ema.state_dict()
        atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))
        write_json(stage_dir / "progress.json", dict(record))

    model.train()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    started, start_wall = record["step"], record["wall_seconds"]
    clock = time.perf_counter()
    running: list[float] = []
    bar = tqdm(total=settings.steps, initial=started, desc=f"pretrain {name}", unit="step",
               disable=not progress, mininterval=10, dynamic_ncols=True)
    for step in range(started, settings.steps):
        model.train()
        factor = learning_rate_factor(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * factor
        loss = loss_at_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        if ema is not None:
            ema.update()
        running.append(float(loss.detach()))
        record["step"] = step + 1
        record["wall_seconds"] = start_wall + time.perf_counter() - clock
        bar.update(1)
        if record["step"] % settings.log_every == 0 or record["step"] == settings.steps:
            record["log"].append({"step": record["step"], "loss": float(np.mean(running)),
                                  "wall_seconds": round(record["wall_seconds"], 1)})
            bar.set_postfix(loss=f"{np.mean(running):.4f}")
            running = []
        if record["step"] % settings.checkpoint_every == 0 or record["step"] == settings.steps:
            if evaluate is not None:
                model.eval()
                record.setdefault("evaluations", []).append({"step": record["step"], **evaluate()})
                bar.write(f"{name} step {record['step']}: {record['evaluations'][-1]}")
            checkpoint()
        if stop_after is not None and record["step"] >= stop_after:
            break
    bar.close()
    if record["step"] == started and started > 0:
        tqdm.write(f"{name}: already at step {started} of {settings.steps}, nothing to do")
    model.eval()
    return record


def stage_finished(stage_dir: Path, steps: int) -> bool:
    """True when the stage's final model exists for (at least) this many steps."""
    marker = stage_dir / "final" / "stage.json"
    return marker.is_file() and json.loads(marker.read_text())["record"]["step"] >= steps


def _write_final_marker(stage_dir: Path, record: dict, metrics: dict, config: PretrainConfig) -> None:
    write_json(stage_dir / "final" / "stage.json",
               {"record": record, "metrics": metrics, "config": config.to_json()})


# ---------------------------------------------------------------- stage 1: CLIP

def _clip_loss_function(model, heads: AttributeHeads, tokenizer, data: TrainingData, stage: str,
                        settings: StageSettings, config: PretrainConfig, device: str
                        ) -> Callable[[int], torch.Tensor]:
    """The CLIP objective of batch ``step``: contrastive (captions, one hard negative per
    image, all 56 "a {colour} {shape}" prompts) plus the attribute probes on the image tower.
    With the text tower frozen, the same loss trains the image side only."""
    class_prompts, class_pairs = color_shape_prompts() if config.clip_class_prompts else ([], [])

    def loss_at_step(step: int) -> torch.Tensor:
        indices, captions = data.batch(stage, step, settings.batch_size)
        rng = data.rng(stage, step + 1_000_000_007)
        negatives = [negative for caption in captions
                     for negative in hard_negatives(caption, rng)[:config.clip_hard_negatives]]
        extras = negatives + class_prompts
        ids = tokenize(tokenizer, captions + extras, padding="longest").to(device)
        # A class prompt is true of an image when one of its objects has that colour and shape.
        extra_true = torch.zeros(len(captions), len(extras), dtype=torch.bool)
        for row, index in enumerate(indices):
            objects = {(o.color, o.shape) for o in data.scenes[index].objects}
            for column, pair in enumerate(class_pairs):
                extra_true[row, len(negatives) + column] = pair in objects
        positives = len(captions)
        pooled = model.vision_model(pixel_values=data.pixels(indices).to(device)).pooler_output
        loss = contrastive_loss(model, None, ids[:positives], ids[positives:] if extras else None,
                                extra_true if extras else None, image_embeds=model.visual_projection(pooled))
        if config.clip_attribute_loss_weight:
            scenes = [data.scenes[i] for i in indices]
            loss = loss + config.clip_attribute_loss_weight * heads.loss(pooled, scenes)
        return loss

    return loss_at_step


def _zero_shot_monitor(model, tokenizer, config: PretrainConfig, device: str) -> Callable[[], dict]:
    """Zero-shot accuracy on a few held-out scenes (heldout_b; the final report uses heldout_a)."""
    scenes = single_object_scenes("heldout_b", min(config.eval_scenes, 300))
    images = to_tensor(np.stack([render_scene(s) for s in scenes])).to(device)
    truth = [(s.objects[0].color, s.objects[0].shape) for s in scenes]

    def monitor() -> dict:
        metrics = accuracy_against(classify_color_shape(model, tokenizer, images), truth)
        return {k: round(v, 4) for k, v in metrics.items() if k != "count"}

    return monitor


def _run_clip_stage(name: str, model, tokenizer, data: TrainingData, stage_dir: Path, config: PretrainConfig,
                    device: str, resume: bool, progress: bool, stop_after: int | None) -> dict:
    """Train ``model`` (its trainable part) with new attribute probes; save it when finished."""
    settings = getattr(config, name)
    heads = AttributeHeads(config.clip_size.vision_width)
    # The optimiser trains the CLIP and the auxiliary attribute probes together.
    trained = nn.ModuleDict({"clip": model, "attribute_heads": heads}).to(device)
    loss_at_step = _clip_loss_function(model, heads, tokenizer, data, name, settings, config, device)
    record = run_stage(name, trained, settings, loss_at_step, stage_dir, resume, progress=progress,
                       stop_after=stop_after, evaluate=_zero_shot_monitor(model, tokenizer, config, device))
    if record["step"] >= settings.steps:
        _finish_clip_stage(name, model, tokenizer, stage_dir, record, config, device, progress)
    return record


def _finish_clip_stage(name: str, model, tokenizer, stage_dir: Path, record: dict, config: PretrainConfig,
                       device: str, progress: bool) -> None:
    save_world_clip(model, tokenizer, stage_dir / "final")
    metrics = zero_shot_accuracy(model.cpu(), tokenizer, "heldout_a", config.eval_scenes)
    model.to(device)
    _write_final_marker(stage_dir, record, {"zero_shot_heldout_a": metrics}, config)
    if progress:
        tqdm.write(f"{name} zero-shot on heldout_a: colour {metrics['color']:.1%}, "
                   f"shape {metrics['shape']:.1%}")


def train_clip(data: TrainingData, stage_dir: Path, config: PretrainConfig, device: str = "cpu",
               resume: bool = False, progress: bool = True, stop_after: int | None = None):
    """Joint contrastive pretraining of both towers. Returns (model, tokenizer, record).

    Besides the captions of the batch, every image is scored against one hard negative
    caption and all 56 "a {colour} {shape}" prompts, and linear attribute probes on the
    image tower add a supervised signal (see ``AttributeHeads``). This stage fixes the
    text tower; shape is learned by the image tower later, in ``train_clip_image``.
    """
    settings = config.clip
    if resume and stage_finished(stage_dir, settings.steps):
        model, tokenizer = load_world_clip(stage_dir / "final")
        return model.to(device), tokenizer, _read_record(stage_dir)
    tokenizer = build_world_tokenizer()
    model = build_world_clip(tokenizer, config.clip_size, seed=config.seed)
    whiten_patch_embedding(model, data.pixels(np.arange(min(len(data), 2000))))
    record = _run_clip_stage("clip", model, tokenizer, data, stage_dir, config, device, resume, progress,
                             stop_after)
    return model, tokenizer, record


def train_clip_image(data: TrainingData, stage_dir: Path, config: PretrainConfig, clip_model, tokenizer,
                     device: str = "cpu", resume: bool = False, progress: bool = True,
                     stop_after: int | None = None):
    """Go on training the image side of the joint CLIP with its text tower locked.

    A from-scratch ViT on 64×64 scenes needs thousands of steps before it tells shapes
    apart (colour takes 200); the text tower is done long before. Locking it lets the
    UNet train on the final text encoder while the image tower, its projection, the text
    projection and the temperature go on learning, each step three times cheaper than a
    joint one. The text tower stays bit-identical, so the saved CLIP's text model is the
    pipeline's text encoder. Returns (model, record).
    """
    settings = config.clip_image
    if resume and stage_finished(stage_dir, settings.steps):
        model, _ = load_world_clip(stage_dir / "final")
        return model.to(device), _read_record(stage_dir)
    model = type(clip_model)(clip_model.config)
    model.load_state_dict(clip_model.state_dict())
    model.text_model.requires_grad_(False)
    torch.manual_seed(config.seed + _STAGE_SALT["clip_image"])  # fresh probes, the same in every run
    record = _run_clip_stage("clip_image", model, tokenizer, data, stage_dir, config, device, resume,
                             progress, stop_after)
    return model, record


def load_finished_vae(stage_dir: Path):
    """The final VAE of a finished stage (with its latent ``scaling_factor``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(stage_dir / "final").eval()


def load_finished_unet(stage_dir: Path):
    """The final (EMA) UNet of a finished stage."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(stage_dir / "final").eval()


def _read_record(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "final" / "stage.json").read_text())["record"]


def text_encoder_from_clip(clip_model):
    """The CLIP's text tower as a standalone ``CLIPTextModel`` (the pipeline's text encoder)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip_model.config.text_config)
    # transformers 5 keeps a whole CLIPTextModel in CLIPModel.text_model; 4.x a bare transformer.
    target = text_encoder if isinstance(clip_model.text_model, CLIPTextModel) else text_encoder.text_model
    target.load_state_dict(clip_model.text_model.state_dict())
    return text_encoder.to(clip_model.device).eval().requires_grad_(False)


# ---------------------------------------------------------------- stage 2: VAE

def build_world_vae(config: PretrainConfig, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_channels),
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_groups,
        sample_size=64,
    )


def train_vae(data: TrainingData, stage_dir: Path, config: PretrainConfig, device: str = "cpu",
              resume: bool = False, progress: bool = True, stop_after: int | None = None):
    """L1 + MSE reconstruction with a small KL term; sets ``scaling_factor`` from the latents' std."""
    settings = config.vae
    if resume and stage_finished(stage_dir, settings.steps):
        return load_finished_vae(stage_dir).to(device), _read_record(stage_dir)
    vae = build_world_vae(config, seed=config.seed).to(device)

    def loss_at_step(step: int) -> torch.Tensor:
        indices, _ = data.batch("vae", step, settings.batch_size)
        pixels = data.pixels(indices).to(device)
        posterior = vae.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=data.torch_generator("vae", step))
        latents = posterior.mean + posterior.std * noise.to(device)
        kl = posterior.kl().mean() / pixels[0].numel()
        return reconstruction_loss(vae.decode(latents).sample, pixels) + config.kl_weight * kl

    record = run_stage("vae", vae, settings, loss_at_step, stage_dir, resume, progress=progress,
                       stop_after=stop_after)
    if record["step"] >= settings.steps:
        vae.eval()
        scaling = latent_scaling_factor(vae, data, device)
        vae.register_to_config(scaling_factor=scaling)
        vae.save_pretrained(stage_dir / "final")
        metrics = {"scaling_factor": scaling, **reconstruction_quality(vae, config.eval_scenes, device)}
        _write_final_marker(stage_dir, record, metrics, config)
        if progress:
            tqdm.write(f"vae: scaling_factor {scaling:.4f}, held-out PSNR {metrics['psnr_heldout_a']:.2f} dB")
    return vae, record


def reconstruction_loss(reconstruction: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """L1 + MSE: L1 keeps flat colours and edges sharp, MSE punishes the rare large error."""
    error = reconstruction - pixels
    return error.abs().mean() + error.pow(2).mean()


def train_vae_decoder(data: TrainingData, stage_dir: Path, config: PretrainConfig, vae, device: str = "cpu",
                      resume: bool = False, progress: bool = True, stop_after: int | None = None):
    """The joint VAE's decoder (and post-quant conv) trained on, its encoder frozen.

    Latents are sampled from the frozen posterior, as the UNet's are, so the decoder learns
    the distribution it will be handed. The encoder, the latent space and the
    ``scaling_factor`` stay exactly those of the joint stage.
    """
    settings = config.vae_decoder
    if resume and stage_finished(stage_dir, settings.steps):
        return load_finished_vae(stage_dir).to(device), _read_record(stage_dir)
    tuned = copy.deepcopy(vae).to(device).requires_grad_(False)  # config (scaling_factor) included
    tuned.decoder.requires_grad_(True)
    tuned.post_quant_conv.requires_grad_(True)
    frozen = [tuned.encoder, tuned.quant_conv]

    def loss_at_step(step: int) -> torch.Tensor:
        indices, _ = data.batch("vae_decoder", step, settings.batch_size)
        pixels = data.pixels(indices).to(device)
        with torch.no_grad():
            for module in frozen:
                module.eval()
            posterior = tuned.encode(pixels).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=data.torch_generator("vae_decoder", step))
            latents = posterior.mean + posterior.std * noise.to(device)
        return reconstruction_loss(tuned.decode(latents).sample, pixels)

    record = run_stage("vae_decoder", tuned, settings, loss_at_step, stage_dir, resume, progress=progress,
                       stop_after=stop_after)
    if record["step"] >= settings.steps:
        tuned.eval()
        tuned.save_pretrained(stage_dir / "final")
        metrics = reconstruction_quality(tuned, config.eval_scenes, device)
        _write_final_marker(stage_dir, record, metrics, config)
        if progress:
            tqdm.write(f"vae_decoder: held-out PSNR {metrics['psnr_heldout_a']:.2f} dB")
    return tuned, record


@torch.no_grad()
def latent_scaling_factor(vae, data: TrainingData, device: str, count: int = 2048) -> float:
    """1 / std of latent samples, so that scaled latents have unit variance (as in SD)."""
    indices = np.arange(min(count, len(data)))
    latents = torch.cat([vae.encode(data.pixels(indices[i:i + 256]).to(device)).latent_dist.sample(
        generator=torch.Generator(device).manual_seed(i)) for i in range(0, len(indices), 256)])
    return float(1.0 / latents.float().std())


@torch.no_grad()
def reconstruction_quality(vae, count: int, device: str, split: str = "heldout_a") -> dict:
    """PSNR (dB, images in [0, 1]) of reconstructed held-out scenes."""
    images = to_tensor(np.stack([render_scene(world_scene(split, i)) for i in range(count)]))
    errors = []
    for start in range(0, count, 128):
        batch = images[start:start + 128].to(device)
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
        errors.append(((reconstruction - batch) / 2).pow(2).flatten(1).mean(1).cpu())
    mse = torch.cat(errors)
    return {f"psnr_{split}": float((10 * torch.log10(1 / mse)).mean()), "count": count}


# ---------------------------------------------------------------- stage 3: UNet

def build_world_unet(config: PretrainConfig, cross_attention_dim: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    levels = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=64 // 2 ** (len(config.vae_channels) - 1),
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=tuple(config.unet_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=config.unet_attention_heads,
        norm_num_groups=config.unet_norm_groups,
    )


def training_noise_scheduler():
    """SD's DDPM schedule: 1000 steps, scaled_linear betas 0.00085 → 0.012, ε-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)


def sampling_scheduler():
    """What the shipped pipeline samples with: DPM-Solver++ (2M), good in 20–30 steps."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon",
                                       algorithm_type="dpmsolver++", solver_order=2,
                                       timestep_spacing="trailing", steps_offset=1)


@torch.no_grad()
def encode_latents(vae, data: TrainingData, cache_path: Path, device: str, progress: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image, cached (atomically) for the UNet stage."""
    if cache_path.is_file():
        cached = torch.load(cache_path, map_location="cpu")
        if len(cached["mean"]) == len(data):
            return cached["mean"].float(), cached["std"].float()
    means, stds = [], []
    for start in tqdm(range(0, len(data), 256), desc="encode latents", unit="batch", disable=not progress,
                      mininterval=10):
        indices = np.arange(start, min(start + 256, len(data)))
        posterior = vae.encode(data.pixels(indices).to(device)).latent_dist
        means.append(posterior.mean.half().cpu())
        stds.append(posterior.std.half().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    atomic_write(cache_path, lambda tmp: torch.save({"mean": mean, "std": std}, tmp))
    return mean.float(), std.float()


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, captions: list[str], device: str) -> torch.Tensor:
    """Per-token hidden states, exactly what ``StableDiffusionPipeline.encode_prompt`` feeds the UNet."""
    return text_encoder(tokenize(tokenizer, captions).to(device))[0]


def train_unet(data: TrainingData, stage_dir: Path, config: PretrainConfig, clip_model, tokenizer, vae,
               device: str = "cpu", resume: bool = False, progress: bool = True,
               stop_after: int | None = None):
    """ε-prediction on VAE latents, conditioned on the frozen CLIP text tower, with caption dropout.

    Returns the EMA UNet and the stage record.
    """
    settings = config.unet
    if resume and stage_finished(stage_dir, settings.steps):
        return load_finished_unet(stage_dir).to(device), _read_record(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    text_encoder = text_encoder_from_clip(clip_model)
    vae = vae.to(device).eval().requires_grad_(False)
    latent_mean, latent_std = encode_latents(vae, data, stage_dir / "latents.pt", device, progress)
    scaling = float(vae.config.scaling_factor)
    noise_scheduler = training_noise_scheduler()
    alphas_cumprod = noise_scheduler.alphas_cumprod
    unet = build_world_unet(config, text_encoder.config.hidden_size, seed=config.seed).to(device)
    ema = ExponentialMovingAverage(unet.parameters(), config.ema_decay)

    def loss_at_step(step: int) -> torch.Tensor:
        indices, captions = data.batch("unet", step, settings.batch_size)
        rng = data.rng("unet", step + 1_000_000_007)
        captions = ["" if rng.random() < config.empty_prompt_probability else c for c in captions]
        generator = data.torch_generator("unet", step)
        index = torch.from_numpy(indices)
        posterior_noise = torch.randn(latent_mean[index].shape, generator=generator)
        latents = (latent_mean[index] + latent_std[index] * posterior_noise) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(indices),),
                                  generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = encode_prompts(text_encoder, tokenizer, captions, device)
        prediction = unet(noisy.to(device), timesteps.to(device), hidden).sample
        per_sample = F.mse_loss(prediction.float(), noise.to(device), reduction="none").mean((1, 2, 3))
        if config.snr_gamma is not None:
            snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
            per_sample = per_sample * (snr.clamp(max=config.snr_gamma) / snr).to(device)
        return per_sample.mean()

    record = run_stage("unet", unet, settings, loss_at_step, stage_dir, resume, ema=ema, progress=progress,
                       stop_after=stop_after)
    if record["step"] >= settings.steps:
        ema.copy_to(unet.parameters())
        unet.save_pretrained(stage_dir / "final")
        _write_final_marker(stage_dir, record, {}, config)
    return unet, record


# ---------------------------------------------------------------- assembly

def assemble_pipeline(clip_model, tokenizer, vae, unet):
    """The three models as a ``StableDiffusionPipeline`` (no safety checker: a synthetic world)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder_from_clip(clip_model),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def declare_float32_text_encoder(model_dir: Path) -> None:
    """Make the saved text encoder's config name float32 (its weights stay fp16 on disk).

    transformers ≥ 5 creates a model in its config's dtype when none is given, while diffusers
    loads the UNet and VAE in float32: with "float16" in the config, a plain
    ``StableDiffusionPipeline.from_pretrained(model_dir)`` mixed Half and Float and failed at the
    first denoising step. An explicit ``torch_dtype`` still wins for every component.
    """

    config_file = model_dir / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "float32"
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_text(config_file, text)


def save_embedded_model(pipe, clip_model, tokenizer, model_dir: Path,
                        dtype: torch.dtype = torch.float16) -> None:
    """Pipeline (fp16 safetensors) + the world CLIP in ``world_clip/``, written next to each other."""
    model_dir.mkdir(parents=True, exist_ok=True)
    pipe.to(dtype).save_pretrained(model_dir, safe_serialization=True)
    pipe.to(torch.float32)
    declare_float32_text_encoder(model_dir)
    clip_copy = type(clip_model)(clip_model.config)
    clip_copy.load_state_dict(clip_model.state_dict())
    save_world_clip(clip_copy.to(dtype), tokenizer, model_dir / "world_clip")


def pretrain_all(output_dir: Path, config: PretrainConfig, stages: tuple[str, ...] = STAGES,
                 device: str = "cpu", resume: bool = False, progress: bool = True,
                 model_dir: Path | None = None) -> dict:
    """Run the requested stages in order: clip, clip_image, vae, vae_decoder, unet.

    ``clip_image`` and ``unet`` need the joint CLIP (its text tower); ``vae_decoder`` and
    the UNet need the joint VAE (the UNet only its encoder), finished in this call or an
    earlier one. Independent stages can run in separate processes at once: ``clip`` with
    ``vae``, then ``clip_image`` with ``unet`` (and ``vae_decoder``). Returns the stage
    records. Once every stage is finished and one of the last three ran in this call, the
    pipeline (with the tuned decoder) and the world CLIP are written to ``model_dir``.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown --stages {unknown}; choose from {', '.join(STAGES)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "config.json", config.to_json())
    data = load_training_data(output_dir / "data", config, progress)
    records: dict[str, dict] = {}

    def need(stage: str) -> None:
        if stage not in stages and not finished(stage):
            raise FileNotFoundError(f"stage '{stage}' is not finished in {output_dir}; "
                                    "include it in --stages")

    def finished(stage: str) -> bool:
        return stage_finished(output_dir / stage, getattr(config, stage).steps)

    if {"clip", "clip_image", "unet"} & set(stages):
        need("clip")
        clip_model, tokenizer, records["clip"] = train_clip(data, output_dir / "clip", config, device,
                                                            resume=resume or "clip" not in stages,
                                                            progress=progress)
    if "clip_image" in stages:
        _, records["clip_image"] = train_clip_image(data, output_dir / "clip_image", config, clip_model,
                                                    tokenizer, device, resume=resume, progress=progress)
    if {"vae", "vae_decoder", "unet"} & set(stages):
        need("vae")
        vae, records["vae"] = train_vae(data, output_dir / "vae", config, device,
                                        resume=resume or "vae" not in stages, progress=progress)
    if "vae_decoder" in stages:
        _, records["vae_decoder"] = train_vae_decoder(data, output_dir / "vae_decoder", config, vae, device,
                                                      resume=resume, progress=progress)
    if "unet" in stages:
        _, records["unet"] = train_unet(data, output_dir / "unet", config, clip_model, tokenizer, vae,
                                        device, resume=resume, progress=progress)
    last_stages = {"clip_image", "vae_decoder", "unet"}
    if model_dir is not None and last_stages & set(stages) and all(map(finished, STAGES)):
        world_clip, tokenizer = load_world_clip(output_dir / "clip_image" / "final")
        pipe = assemble_pipeline(world_clip, tokenizer, load_finished_vae(output_dir / "vae_decoder"),
                                 load_finished_unet(output_dir / "unet"))
        save_embedded_model(pipe, world_clip, tokenizer, model_dir)
        write_json(model_dir / "pretraining.json", {"config": config.to_json(), "stages": {
            stage: {k: v for k, v in _read_record(output_dir / stage).items() if k != "log"}
            for stage in STAGES}})
    return records


def with_steps(config: PretrainConfig, **steps: int | None) -> PretrainConfig:
    """A copy of ``config`` with some stages' step counts replaced (None keeps the default)."""
    updates = {name: replace(getattr(config, name), steps=value)
               for name, value in steps.items() if value is not None}
    return replace(config, **updates)
