"""difftune: parameter-efficient fine-tuning of diffusion models.

    import difftune
    adapter = difftune.add_adapter(pipe.unet, "lora", targets="attn", rank=4)
    ...several named adapters of any methods: add_adapter(..., name=), load_adapter(..., adapter_name=),
    set_adapters(pipe, ["style", "subject"], [0.8, 1.0])...
    ...train difftune.trainable_parameters(pipe.unet)...
    difftune.save_adapter(pipe.unet, "out/adapter.safetensors")
    difftune.load_adapter(fresh_pipe, "out/adapter.safetensors", scale=1.0)
"""

from ._version import __version__
from .quiet import silence_third_party_noise

silence_third_party_noise()  # before diffusers and transformers are imported: see difftune/quiet.py

from .api import (  # noqa: E402
    AdapterSpec,
    active_adapters,
    adapted_text_encoders,
    add_adapter,
    check_adapter,
    count_trainable_parameters,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    find_denoiser,
    get_adapter,
    has_adapter,
    list_adapters,
    load_adapter,
    merge_adapter,
    named_trainable_parameters,
    read_adapter_info,
    remove_adapter,
    save_adapter,
    set_adapter_scale,
    set_adapters,
    trainable_parameters,
    unmerge_adapter,
)
from .errors import AdapterFileError, BaseModelMismatchError, DifftuneError, TargetError  # noqa: E402
from .tuners import METHODS, register_method  # noqa: E402

__all__ = [
    "METHODS",
    "AdapterFileError",
    "AdapterSpec",
    "BaseModelMismatchError",
    "DifftuneError",
    "TargetError",
    "__version__",
    "active_adapters",
    "adapted_text_encoders",
    "add_adapter",
    "check_adapter",
    "count_trainable_parameters",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "export_adapter",
    "find_denoiser",
    "format_parameter_table",
    "get_adapter",
    "has_adapter",
    "list_adapters",
    "load_adapter",
    "merge_adapter",
    "named_trainable_parameters",
    "parameter_table",
    "read_adapter_info",
    "register_method",
    "remove_adapter",
    "save_adapter",
    "set_adapter_scale",
    "set_adapters",
    "trainable_parameters",
    "unmerge_adapter",
]


def __getattr__(name: str):
    # imported lazily so that ``python -m difftune.params`` does not import itself twice
    if name in ("parameter_table", "format_parameter_table"):
        from . import params

        return getattr(params, name)
    if name == "export_adapter":  # imported lazily: it pulls in the pipeline builders
        from .export import export_adapter

        return export_adapter
    raise AttributeError(f"module 'difftune' has no attribute {name!r}")
