"""Peak memory of a whole-model export at SD 1.5 size: `--format diff` and `--format single-file`.

Builds an SD 1.5-size pipeline from configs (the UNet of `model_factory.SD15_UNET_CONFIG`, SD 1.5's
VAE and CLIP ViT-L/14 text encoder; random weights, no download), attaches an adapter on every
Linear and Conv layer of the UNet (LoRA rank 4 by default, random factors, so ΔW is dense in every
layer), saves it, and exports it with `difftune.export_adapter` onto the loaded pipeline. Each
format runs in its own process; the process's peak RSS is reset (``/proc/self/clear_refs``) once the
model is built, so the peak is the export's, with the model in memory. The target: below 1.5x the
model's own size (the streamed writer holds about one tensor beside the model).

    python benchmarks/export_memory.py                      # LoRA r4 on all layers, both formats
    python benchmarks/export_memory.py --methods lora sara  # SaRA (budget 1 %, biases and norms) too
    python benchmarks/export_memory.py --docs docs/export.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Export memory"
OPTIONS = {"lora": {"rank": 4}, "sara": {"budget": 0.01, "include_bias_norm": True}}
# SD 1.5's VAE and CLIP ViT-L/14 text encoder (public configs)
SD15_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "norm_num_groups": 32, "sample_size": 512}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
          "projection_dim": 768}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=["diff", "single-file"],
                        choices=["diff", "single-file"])
    parser.add_argument("--methods", nargs="+", default=["lora"], choices=sorted(OPTIONS))
    parser.add_argument("--unet", default="sd15", choices=["sd15", "tiny"], help="tiny: a smoke run")
    parser.add_argument("--docs", type=Path, default=None,
                        help="markdown file whose export-memory section is replaced with the table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- one export, in its own process ---------------------------------------------------------

def rss(field: str) -> int:
    """VmRSS or VmHWM of this process, in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def sd15_pipeline(unet_kind: str):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.model_factory import SD15_UNET_CONFIG, offline_clip_tokenizer, tiny_sd_pipeline

    if unet_kind == "tiny":
        return tiny_sd_pipeline(0)
    torch.manual_seed(0)
    tokenizer = offline_clip_tokenizer()
    config = CLIPTextConfig(**CLIP_L, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):  # allocate once, then fill: faster than each layer's own init
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(config)
    for model in (unet, vae, text_encoder):
        model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02)
            for name, buffer in model.named_buffers():
                if name.endswith("position_ids"):
                    buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_child(spec: dict) -> dict:
    import torch

    import difftune
    from difftune.export import export_adapter

    torch.set_num_threads(2)
    pipe = sd15_pipeline(spec["unet"])
    model_bytes = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
                      for p in m.parameters())
    difftune.add_adapter(pipe, spec["method"], targets="all", **OPTIONS[spec["method"]])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in difftune.trainable_parameters(pipe):
            param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
    folder = Path(spec["folder"])
    adapter = difftune.save_adapter(pipe, folder / "adapter.safetensors", base_model="sd15-size (random)")
    difftune.remove_adapter(pipe)
    del generator
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on is the export's
    before = rss("VmRSS")
    started = time.perf_counter()
    output = folder / f"export-{spec['format']}.safetensors"
    export_adapter(adapter, output, spec["format"], pipeline=pipe, psnr_images=0)
    seconds = time.perf_counter() - started
    result = {"method": spec["method"], "format": spec["format"], "model_bytes": model_bytes,
              "rss_before": before, "peak": rss("VmHWM"), "output_bytes": output.stat().st_size,
              "seconds": seconds}
    output.unlink()
    return result


# --- the parent -------------------------------------------------------------------------------

def machine_description() -> str:
    import torch

    from difftune.machine import cpu_name, memory_bytes

    memory = memory_bytes() or 0
    return (f"{cpu_name()}, {os.cpu_count()} cores, {memory / 2**30:.0f} GiB RAM, torch "
            f"{torch.__version__}, load average {os.getloadavg()[0]:.1f} at the start")


def run(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    with tempfile.TemporaryDirectory(prefix="export-memory-") as folder:
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "folder": folder})],
                              env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{spec}: the export failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], machine: str, unet: str) -> str:
    gib = 2**30
    lines = [f"Machine: {machine}. Model: {'SD 1.5 size' if unet == 'sd15' else 'tiny'} UNet, VAE and "
             "CLIP text encoder, fp32, random weights; the adapter on every UNet Linear/Conv layer. Peak: "
             "the export process's peak RSS (VmHWM, reset once the model was built), model and Python "
             "runtime included; beyond: peak minus the RSS just before the export.", "",
             "| adapter | format | model | RSS before | peak | beyond | peak / model | output file | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        options = ", ".join(f"{k} {v}" for k, v in OPTIONS[r["method"]].items())
        lines.append(f"| {r['method']} ({options}) | {r['format']} | {r['model_bytes'] / gib:.2f} GiB | "
                     f"{r['rss_before'] / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB | "
                     f"{(r['peak'] - r['rss_before']) / gib:.2f} GiB | {r['peak'] / r['model_bytes']:.2f} | "
                     f"{r['output_bytes'] / gib:.2f} GiB | {r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def write_section(docs: Path, text: str) -> None:
    page = docs.read_text()
    body = f"{SECTION}\n\n`python benchmarks/export_memory.py --docs docs/export.md`:\n\n{text}"
    pattern = re.compile(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    page = pattern.sub(lambda _: body, page) if pattern.search(page) else page.rstrip() + "\n\n" + body
    docs.write_text(page)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    machine = machine_description()
    results = [run({"method": m, "format": f, "unet": args.unet}) for m in args.methods for f in args.formats]
    text = table(results, machine, args.unet)
    print(text)
    if args.docs:
        write_section(args.docs, text)


if __name__ == "__main__":
    main()
