"""Third-party noise every run printed is gone; what those loggers say otherwise still shows."""

import logging
import os
import subprocess
import sys

from conftest import ROOT

NOISE = ("requires torchvision (not installed)", "should be kept in float32: []",
         "`torch_dtype` is deprecated")


def test_loading_and_casting_pipelines_prints_none_of_the_known_noise():
    script = ("import torch, difftune\n"
              "from difftune.model_factory import load_pipeline\n"
              "from difftune.training.loop import load_base_pipeline\n"
              "from difftune.training.settings import ModelSettings\n"
              "load_pipeline('builtin:tiny-sd').vae.to(torch.bfloat16)\n"
              "load_pipeline('builtin:embedded', torch_dtype=torch.bfloat16)\n"
              "load_base_pipeline(ModelSettings('builtin:embedded'), torch.bfloat16, torch.device('cpu'))\n"
              "from difftune.metrics.features import load_clip_model\n"
              "load_clip_model('assets/embedded_model/world_clip')\n"
              "print('done')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    for noise in NOISE:
        assert noise not in result.stderr


def test_the_filters_drop_only_the_noise(caplog):
    import difftune  # noqa: F401 (installs the filters)

    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    transformers_logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING):
        diffusers_logger.warning("There are modules in AutoencoderKL that should be kept in float32: []. x")
        diffusers_logger.warning("There are modules in UNet2DConditionModel that should be kept in float32: "
                                 "['proj_out']. x")
        transformers_logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back "
                                    "to `CLIPImageProcessorPil` for backward compatibility.")
        transformers_logger.warning("`torchaudio` is needed for this model")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "There are modules in UNet2DConditionModel that should be kept in float32", "`torchaudio` is needed "
        "for this model"]
