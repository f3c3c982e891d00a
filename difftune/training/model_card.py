"""A short README.md next to a trained adapter: what it is, how it was made, how to use it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import write_text


def write_model_card(
    output_dir: str | Path,
    *,
    base_model: str,
    family: str,
    method: str,
    options: dict[str, Any],
    targets: Sequence[str] | str,
    trainable_parameters: int,
    steps: int,
    instance_prompt: str,
    training: dict[str, Any],
    sample_images: Sequence[str] = (),
    sample_prompt: str | None = None,
    diffusers_weight_name: str | None = None,
    video: bool = False,
    diffusers_loading: Sequence[tuple[str, dict[str, Any]]] = (),
) -> Path:
    """Write ``README.md`` (hub-style front matter, then the facts and a usage snippet). A video
    model's samples are an animated WebP and a frame strip (embedded) and an mp4 (linked)."""
    output_dir = Path(output_dir)
    targets_text = targets if isinstance(targets, str) else ", ".join(targets)
    lines = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "library_name: difftune",
        "tags:",
        "- difftune",
        f"- {method}",
        "- dreambooth",
        f"- {family}",
        f"instance_prompt: {json.dumps(instance_prompt)}",
        "---",
        "",
        f"# {method} adapter: subject-driven fine-tune of `{base_model}`",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base_model}` ({family}) |",
        f"| method | `{method}` |",
        f"| options | `{json.dumps(options, sort_keys=True, default=str)}` |",
        f"| targets | `{targets_text}` |",
        f"| trainable parameters | {trainable_parameters:,} |",
        f"| optimizer steps | {steps} |",
        f"| instance prompt | `{instance_prompt}` |",
    ]
    lines += [f"| {key.replace('_', ' ')} | `{value}` |" for key, value in training.items()]
    if sample_images:
        lines += ["", f"## Samples{f' for `{sample_prompt}`' if sample_prompt else ''}", ""]
        lines += [f"[{name}]({name})" if name.endswith(".mp4") else f"![sample]({name})"
                  for name in sample_images]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import difftune",
        "from difftune.model_factory import load_pipeline",
        f"pipe = load_pipeline({base_model!r})",
        'difftune.load_adapter(pipe, "adapter.safetensors", scale=1.0)',
        *([f"frames = pipe({instance_prompt!r}, num_frames=33, output_type='pil').frames[0]  # a clip",
           "from diffusers.utils import export_to_video; export_to_video(frames, 'clip.mp4', fps=16)"]
          if video else [f"image = pipe({instance_prompt!r}).images[0]"]),
        "```",
        "",
    ]
    if diffusers_loading:  # several denoisers (experts): one diffusers file each
        lines += ["diffusers reads the LoRA as one file per expert:", "", "```python"]
        lines += [f"pipe.load_lora_weights(folder, weight_name={name!r}"
                  + "".join(f", {key}={value!r}" for key, value in kwargs.items()) + ")"
                  for name, kwargs in diffusers_loading]
        lines += ["```", ""]
    elif diffusers_weight_name:
        lines += ["The file is also a diffusers LoRA: `pipe.load_lora_weights(folder)` reads "
                  f"`{diffusers_weight_name}`.", ""]
    text = "\n".join(lines)
    return write_text(output_dir / "README.md", text)
