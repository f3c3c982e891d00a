"""The trainer started as a forked child for the kill test: imported once by the fork server, so every
start skips importing torch, diffusers and the trainer (test_kill_resilience.py)."""

import importlib
import os
import signal
import sys
from pathlib import Path

import torch
from conftest import command_module  # conftest imports difftune first: the libraries stay quiet

# imported once, in the fork server: what a start of the trainer would import
for module in ("diffusers.models.autoencoders.autoencoder_kl", "diffusers.models.unets.unet_2d_condition",
               "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
               "transformers.models.clip.modeling_clip", "difftune.export", "difftune.training.loop"):
    importlib.import_module(module)
TRAINER = command_module("train_subject")


def die_at(kill, out: Path) -> None:
    """Make this child SIGKILL itself at ``kill`` = (what, name, nth): right before the ``nth`` rename
    (``os.replace``, ``Path.rename``) or deletion (``shutil.rmtree``) of a path whose name starts or
    ends with ``name``; nth "final": the first such rename into the output folder itself."""
    import shutil

    what, name, nth = kill
    seen = {"n": 0}

    def matches(path) -> bool:
        path = Path(path)
        hit = path.name.startswith(name) or path.name.endswith(name)
        if nth == "final":
            return hit and path.parent == out
        seen["n"] += hit
        return hit and seen["n"] == nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if what == "replace":
        real_replace = os.replace
        os.replace = lambda src, dst: die() if matches(dst) else real_replace(src, dst)
    elif what == "rename":
        real_rename = Path.rename
        Path.rename = lambda self, target: die() if matches(self) else real_rename(self, target)
    else:
        real_rmtree = shutil.rmtree
        shutil.rmtree = lambda path, *a, **k: die() if matches(path) else real_rmtree(path, *a, **k)


def run_trainer(flags: list[str], kill, out: str) -> None:
    """One start of the trainer; its output goes nowhere."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    sys.argv = ["train_subject.py", *flags]
    torch.set_num_threads(1)
    if kill is not None:
        die_at(kill, Path(out))
    TRAINER.main(flags)
