"""Adapter files: safetensors tensors plus JSON metadata in the header.

The header's ``difftune`` entry holds everything needed to rebuild the adapter on a
fresh base model (method, config, targeted modules) and to refuse the wrong base
(a fingerprint). `AdapterFile` owns that schema: it writes it, reads and validates it, and
hands each component's part to the methods as an `AdapterSection`. Files are written
atomically: a temporary file in the same folder, then ``os.replace``, so an interrupted
save never leaves a half-written adapter.
Pickle-based files are refused outright: loading one can run arbitrary code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ._version import __version__
from .errors import AdapterFileError, BaseModelMismatchError, DifftuneError
from .io import atomic_write

METADATA_KEY = "difftune"
FORMAT_VERSION = 1
DEFAULT_FILE_NAME = "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor a writer asks for only when it writes it: its shape and dtype now, ``make()`` then."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                      torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
Entry = tuple[str, torch.dtype, tuple[int, ...]]  # name, dtype, shape


def _header(entries: list[Entry], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (length, JSON, padding) of ``entries`` in this order, data back to back;
    the metadata's keys sorted (two identical saves give identical bytes)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in SAFETENSORS_DTYPES:
            raise DifftuneError(f"tensor '{name}': safetensors cannot hold {dtype}")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data region to 8 bytes
    return len(text).to_bytes(8, "little") + text


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | LazyTensor], metadata: dict[str, str] | None
) -> Path:
    """Write tensors (on CPU) with string metadata, atomically and byte-reproducibly, one tensor at a time.

    The header goes first, then each tensor's bytes straight from its memory: nothing but the tensor
    being written is held beside the caller's (a `LazyTensor` is made just then and dropped after, so an
    export of a whole model streams). Tensors are laid out by element size, largest first, then by
    name, so each starts aligned to its element size, as safetensors' own writer does."""
    def itemsize(value: torch.Tensor | LazyTensor) -> int:
        return torch.empty((), dtype=value.dtype).element_size()

    order = sorted(tensors, key=lambda name: (-itemsize(tensors[name]), name))
    entries = [(name, tensors[name].dtype, tuple(tensors[name].shape)) for name in order]
    head = _header(entries, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(head)
            for name, dtype, shape in entries:
                value = tensors[name]
                value = value.make() if isinstance(value, LazyTensor) else value
                value = value.detach().to("cpu").contiguous()
                if value.dtype != dtype or tuple(value.shape) != shape:
                    raise RuntimeError(f"tensor '{name}' was announced as {dtype} {list(shape)}, made as "
                                       f"{value.dtype} {list(value.shape)}")
                if value.numel():
                    handle.write(value.reshape(-1).view(torch.uint8).numpy().data)
                del value

    return atomic_write(path, write)


def content_checksum(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> str:
    """SHA-256 of the ``difftune`` header entry (all but this checksum) and of every tensor's name,
    dtype, shape and bytes.

    Stored in the header on save and compared on load: a flipped byte in the data region changes a
    weight, and an edited header a scale, silently; safetensors itself notices neither.
    """
    fields = {k: v for k, v in info.items() if k != CHECKSUM_FIELD}
    canonical = json.dumps(json.loads(json.dumps(fields, default=str)), sort_keys=True)
    digest = hashlib.sha256(canonical.encode())
    for key in sorted(tensors):
        value = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"|{key}|{str(value.dtype).removeprefix('torch.')}|{list(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, else None."""
    for key in sorted(tensors):
        value = tensors[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def resolve_adapter_path(path: str | os.PathLike) -> Path:
    """Find the adapter file for a path (a file, or a folder holding adapter.safetensors)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{path}: refusing a pickle-based file ({path.suffix}). difftune never unpickles "
            "files, since that can run arbitrary code; use a .safetensors adapter."
        )
    if path.is_dir():
        candidate = path / DEFAULT_FILE_NAME
        if not candidate.is_file():
            raise AdapterFileError(f"{path}: folder has no {DEFAULT_FILE_NAME}")
        return candidate
    if not path.exists():
        raise AdapterFileError(f"{path}: no such adapter file")
    if not path.is_file():
        raise AdapterFileError(f"{path}: not a regular file (a device, pipe or socket); "
                               "give a .safetensors file")
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the header metadata; a damaged file gives AdapterFileError."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterFileError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    return tensors, metadata


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, difftune_metadata)`` for a difftune adapter file, checked.

    The header must fit `HEADER_SCHEMA`, the tensors their checksum (when the file has one:
    files written before it load without the check) and hold no NaN or inf. Every refusal is an
    AdapterFileError naming the file and the field or tensor, before any model is touched.
    """
    return _read_checked(resolve_adapter_path(path))


def _read_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`read_adapter_file` for a path `resolve_adapter_path` already gave."""
    tensors, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:
        damage = difftune_traces(metadata)
        if damage:
            raise AdapterFileError(f"{path}: a damaged difftune adapter ({damage}): refused, not imported as "
                                   "another tool's LoRA")
        hint = (" It looks like a LoRA file of another tool: difftune.load_adapter(pipe, path) imports "
                "it, pipe.load_lora_weights() loads it." if any("lora" in k for k in tensors) else "")
        raise AdapterFileError(f"{path}: not a difftune adapter (no '{METADATA_KEY}' metadata).{hint}")
    try:
        info = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: damaged difftune metadata: {err}") from None
    check_header(info, path)
    expected = info.get(CHECKSUM_FIELD)
    if expected is not None and content_checksum(tensors, info) != expected:
        raise AdapterFileError(f"{path}: tensors or header do not match the checksum in the header "
                               f"('{CHECKSUM_FIELD}'): the file is corrupt")
    if not tensors:
        raise AdapterFileError(f"{path}: the file holds no tensors")
    bad = first_non_finite(tensors)
    if bad is not None:
        raise AdapterFileError(f"{path}: tensor '{bad}' holds NaN or inf values")
    return tensors, info


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]


def difftune_traces(metadata: dict[str, str]) -> str | None:
    """What in a header without the ``difftune`` entry shows it was a difftune file, else None.

    A flipped bit in the entry's key, or an entry lost while another one kept its JSON, must not turn
    a difftune file into "another tool's LoRA" that loads at the wrong strength: such a file is
    checked (and refused) as a difftune file. Traces: a key within two edits of ``difftune``, or a
    value holding difftune's own header fields (the version, the checksum, or three schema fields).
    """
    for key, value in sorted(metadata.items()):
        if key != METADATA_KEY and _edit_distance(key.lower(), METADATA_KEY) <= 2:
            return f"header entry {key!r} stands where '{METADATA_KEY}' should"
        try:
            fields = json.loads(value)
        except (TypeError, ValueError):
            continue
        if not isinstance(fields, dict):
            continue
        known = set(fields) & {*HEADER_SCHEMA, CHECKSUM_FIELD}
        if "difftune_version" in fields or (CHECKSUM_FIELD in known and len(known) > 1) or len(known) >= 3:
            return f"header entry {key!r} holds difftune's fields ({', '.join(sorted(known)[:4])})"
    return None


def split_sections(tensors: dict[str, torch.Tensor], info: dict[str, Any],
                   source: str) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors by component (``unet``, ``text_encoder``, ...) and the new tokens' embeddings
    (``token_embeddings``), their prefixes removed."""
    names = [info["component"], *info.get("text_encoders", {}), *info.get(EXPERTS, {})]
    names += [TOKEN_EMBEDDINGS] if TOKEN_EMBEDDINGS in info else []
    sections: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in tensors.items():
        name = next((n for n in names if key.startswith(f"{n}.")), None)
        if name is None:
            raise AdapterFileError(f"{source}: tensor '{key}' does not start with any of the file's "
                                   f"components ({', '.join(f'{n}.' for n in names)})")
        sections[name][key[len(name) + 1:]] = value
    return sections


# --- header schema ------------------------------------------------------------------

CHECKSUM_FIELD = "sha256"
_NONE = type(None)
# field → allowed JSON types; every field is required except the checksum (older files lack it)
HEADER_SCHEMA: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "difftune_version": (str,),
    "method": (str,),
    "config": (dict,),
    "component": (str,),
    "targets": (list,),
    "base_model": (str, _NONE),
    "fingerprint": (dict,),
    "extra": (dict,),
}
TOKEN_EMBEDDINGS = "token_embeddings"  # header field and tensor prefix of new tokens (pivotal tuning)
# header field of further denoisers' sections: the experts of a model with several (Wan 2.2's transformer_2)
EXPERTS = "experts"
BASE_ADAPTERS = "base_adapters"  # the frozen adapters it was trained on top of (`--base_adapter`)
OPTIONAL_FIELDS = {CHECKSUM_FIELD: (str,), "text_encoders": (dict,), EXPERTS: (dict,),
                   TOKEN_EMBEDDINGS: (dict,), BASE_ADAPTERS: (list,)}
# the fields that hold further components' sections, each shaped as SECTION_SCHEMA
SECTION_FIELDS = ("text_encoders", EXPERTS)
BASE_ADAPTER_SCHEMA: dict[str, tuple[type, ...]] = {"name": (str,), "method": (str,), "weight": (int, float),
                                                    "source": (str, _NONE), "content": (str,)}
TOKEN_EMBEDDINGS_SCHEMA: dict[str, tuple[type, ...]] = {"identifier": (str,), "tokens": (list,)}
# a text encoder's section (--train_text_encoder): the per-component fields of the header
SECTION_SCHEMA = {field: HEADER_SCHEMA[field] for field in ("method", "config", "targets", "fingerprint",
                                                            "extra")}
FINGERPRINT_SCHEMA: dict[str, tuple[type, ...]] = {"class": (str,), "config_hash": (str, _NONE),
                                                   "shapes": (dict,)}


def _type_names(types: tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", _NONE: "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    # JSON true/false are Python bools, which are ints too: never accept them as numbers
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _check_fields(mapping: dict, schema: dict, optional: dict, where: str, path: Path) -> None:
    for field in schema:
        if field not in mapping:
            raise AdapterFileError(f"{path}: header field '{where}{field}' is missing")
    for field, types in {**schema, **optional}.items():
        if field in mapping and not _is(mapping[field], types):
            raise AdapterFileError(f"{path}: header field '{where}{field}' must be {_type_names(types)}, "
                                   f"got {json.dumps(mapping[field])[:60]}")


def check_header(info: Any, path: Path) -> None:
    """Presence and type of every field of the ``difftune`` header entry, and of the fingerprint's.

    A damaged header must not reach code that indexes into it (a KeyError or TypeError then)."""
    if not isinstance(info, dict):
        raise AdapterFileError(f"{path}: header entry '{METADATA_KEY}' must be a JSON object")
    version = info.get("format_version")
    if _is(version, (int,)) and version > FORMAT_VERSION:
        raise AdapterFileError(f"{path}: written by a newer difftune (format {version}); upgrade difftune.")
    _check_fields(info, HEADER_SCHEMA, OPTIONAL_FIELDS, "", path)
    if info["format_version"] < 1:
        raise AdapterFileError(f"{path}: header field 'format_version' must be at least 1, "
                               f"got {info['format_version']}")
    _check_section(info, "", path)
    for field in SECTION_FIELDS:
        for name, section in info.get(field, {}).items():
            where = f"{field}.{name}."
            if not isinstance(section, dict):
                raise AdapterFileError(f"{path}: header field '{where[:-1]}' must be an object")
            _check_fields(section, SECTION_SCHEMA, {}, where, path)
            _check_section(section, where, path)
    for index, record in enumerate(info.get(BASE_ADAPTERS, [])):
        if not isinstance(record, dict):
            raise AdapterFileError(f"{path}: header field '{BASE_ADAPTERS}.{index}' must be an object")
        _check_fields(record, BASE_ADAPTER_SCHEMA, {}, f"{BASE_ADAPTERS}.{index}.", path)
    if TOKEN_EMBEDDINGS in info:
        tokens = info[TOKEN_EMBEDDINGS]
        _check_fields(tokens, TOKEN_EMBEDDINGS_SCHEMA, {}, f"{TOKEN_EMBEDDINGS}.", path)
        if not tokens["tokens"] or not all(isinstance(t, str) and t for t in tokens["tokens"]):
            raise AdapterFileError(f"{path}: header field '{TOKEN_EMBEDDINGS}.tokens' must be a non-empty "
                                   "list of token names")


def _check_section(section: dict, where: str, path: Path) -> None:
    """Targets, config targets and fingerprint of one component's section."""
    if not all(isinstance(t, str) for t in section["targets"]) or not section["targets"]:
        raise AdapterFileError(f"{path}: header field '{where}targets' must be a non-empty list of module "
                               "names")
    if not _is(section["config"].get("targets"), (str, list)):
        raise AdapterFileError(f"{path}: header field '{where}config.targets' must be a string or a list")
    _check_fields(section["fingerprint"], FINGERPRINT_SCHEMA, {}, f"{where}fingerprint.", path)
    for name, shape in section["fingerprint"]["shapes"].items():
        if shape is not None and not (isinstance(shape, list)
                                      and all(_is(n, (int,)) and n >= 0 for n in shape)):
            raise AdapterFileError(f"{path}: header field '{where}fingerprint.shapes.{name}' must be a list "
                                   "of sizes or null")


# --- base-model fingerprint ---------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_hash(model: nn.Module) -> str | None:
    """Hash of a diffusers model's public config (private ``_`` keys such as the path ignored)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "items"):
        return None
    public = {k: _plain(v) for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model: nn.Module, module_names: Iterable[str]) -> dict[str, Any]:
    """What identifies the base model an adapter belongs to."""
    modules = dict(model.named_modules())
    shapes = {}
    for name in module_names:
        weight = getattr(modules[name], "weight", None)
        shapes[name] = list(weight.shape) if weight is not None else None
    return {"class": type(model).__name__, "config_hash": config_hash(model), "shapes": shapes}


def check_fingerprint(model: nn.Module, expected: dict[str, Any], source: str) -> list[str]:
    """Raise BaseModelMismatchError naming the first mismatch; return soft warnings."""
    if expected["class"] != type(model).__name__:
        raise BaseModelMismatchError(
            f"{source}: adapter was trained on a {expected['class']}, "
            f"but the base model is a {type(model).__name__}"
        )
    modules = dict(model.named_modules())
    for name, shape in expected["shapes"].items():
        if name not in modules:
            raise BaseModelMismatchError(
                f"{source}: base model has no module '{name}' (the adapter targets it)")
        weight = getattr(modules[name], "weight", None)
        found = list(weight.shape) if weight is not None else None
        if found != shape:
            raise BaseModelMismatchError(
                f"{source}: module '{name}' has weight shape {found}, the adapter expects {shape}"
            )
    warnings = []
    current = config_hash(model)
    if expected.get("config_hash") and current and current != expected["config_hash"]:
        warnings.append(f"{source}: base model config differs from the training base "
                        "(all targeted shapes match, loading anyway)")
    return warnings


# --- the file as objects ------------------------------------------------------------

@dataclasses.dataclass
class AdapterSection:
    """One component's adapter in a file (the denoiser's, or a text encoder's): what rebuilds it on a
    fresh model and its tensors, named without the component prefix."""

    method: str
    config: dict[str, Any]
    targets: list[str]
    fingerprint: dict[str, Any]
    extra: dict[str, Any]  # the method's own facts (`Adapter.file_metadata`)
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_header(cls, fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterSection:
        return cls(**{name: fields[name] for name in SECTION_SCHEMA}, tensors=tensors)

    def header(self) -> dict[str, Any]:
        """The section's header fields (`SECTION_SCHEMA`)."""
        return {name: getattr(self, name) for name in SECTION_SCHEMA}

    @property
    def shapes(self) -> dict[str, list[int] | None]:
        """Weight shape of every targeted module of the training base (None: no weight)."""
        return self.fingerprint["shapes"]

    def check_base(self, model: nn.Module, source: str) -> list[str]:
        """`check_fingerprint` of ``model`` against this section: raises on a mismatch, returns warnings."""
        return check_fingerprint(model, self.fingerprint, source)


@dataclasses.dataclass
class TokenEmbeddings:
    """Tokens a file adds to the pipeline's tokenizers (pivotal tuning, difftune.training.pivotal): their
    names, the identifier they stand for, and one (tokens, width) embedding tensor per text encoder."""

    identifier: str
    tokens: list[str]
    tensors: dict[str, torch.Tensor]  # by text-encoder component name (text_encoder, text_encoder_2)

    def header(self) -> dict[str, Any]:
        return {"identifier": self.identifier, "tokens": list(self.tokens)}


@dataclasses.dataclass
class AdapterFile:
    """A difftune adapter file: the header schema (`HEADER_SCHEMA`) written, read and validated in one
    place, and one `AdapterSection` per adapted component."""

    component: str  # the denoiser's name in its pipeline (unet, transformer)
    sections: dict[str, AdapterSection]  # the denoiser's, then each adapted text encoder's and expert's
    base_model: str | None = None
    difftune_version: str = __version__
    format_version: int = FORMAT_VERSION
    source: str = ""  # the path it was read from, for messages
    # further safetensors header entries written beside ours (diffusers' LoRA metadata)
    extra_header: dict[str, str] = dataclasses.field(default_factory=dict)
    token_embeddings: TokenEmbeddings | None = None  # new identifier tokens (pivotal tuning)
    experts: tuple[str, ...] = ()  # which further sections are denoisers (experts), not text encoders
    # the frozen adapters it was trained on top of (`--base_adapter`), as `adapter_set.base_adapter_records`
    base_adapters: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def main(self) -> AdapterSection:
        """The denoiser's section."""
        return self.sections[self.component]

    @property
    def text_encoders(self) -> dict[str, AdapterSection]:
        return {name: section for name, section in self.sections.items()
                if name != self.component and name not in self.experts}

    @property
    def expert_sections(self) -> dict[str, AdapterSection]:
        """The further denoisers' sections (Wan 2.2's low-noise expert beside its high-noise one)."""
        return {name: self.sections[name] for name in self.experts}

    def header(self) -> dict[str, Any]:
        """The ``difftune`` header entry, less its checksum."""
        info = {"format_version": self.format_version, "difftune_version": self.difftune_version,
                **self.main.header(), "component": self.component, "base_model": self.base_model}
        if self.text_encoders:
            info["text_encoders"] = {name: section.header() for name, section in self.text_encoders.items()}
        if self.experts:
            info[EXPERTS] = {name: section.header() for name, section in self.expert_sections.items()}
        if self.token_embeddings is not None:
            info[TOKEN_EMBEDDINGS] = self.token_embeddings.header()
        if self.base_adapters:
            info[BASE_ADAPTERS] = list(self.base_adapters)
        return info

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every section's tensors under its component prefix (``unet.``, ``text_encoder.``), and the new
        tokens' embeddings under ``token_embeddings.``."""
        tensors = {f"{name}.{key}": value for name, section in self.sections.items()
                   for key, value in section.tensors.items()}
        if self.token_embeddings is not None:
            tensors.update({f"{TOKEN_EMBEDDINGS}.{name}": value
                            for name, value in self.token_embeddings.tensors.items()})
        return tensors

    def write(self, path: str | os.PathLike) -> Path:
        """Write atomically, with the content checksum; refuses NaN or inf tensors (a diverged run
        must not leave a file that loads as NaN images). Identical adapters give identical bytes."""
        tensors = self.tensors()
        bad = first_non_finite(tensors)
        if bad is not None:
            raise DifftuneError(f"{path}: not saved: adapter tensor '{bad}' holds NaN or inf values")
        info = self.header()
        info[CHECKSUM_FIELD] = content_checksum(tensors, info)
        metadata = {METADATA_KEY: json.dumps(info, default=str, sort_keys=True), **self.extra_header}
        return write_safetensors(path, tensors, metadata)

    @classmethod
    def read(cls, path: str | os.PathLike, resolved: bool = False) -> AdapterFile:
        """Read and validate a file (`read_adapter_file`'s checks). ``path`` is a file or a folder
        holding adapter.safetensors; ``resolved``: it is what `resolve_adapter_path` returned."""
        path = Path(path) if resolved else resolve_adapter_path(path)
        tensors, info = _read_checked(path)
        source = str(path)
        local = split_sections(tensors, info, source)
        sections = {info["component"]: AdapterSection.from_header(info, local[info["component"]])}
        for field in SECTION_FIELDS:
            sections.update({name: AdapterSection.from_header(fields, local[name])
                             for name, fields in info.get(field, {}).items()})
        tokens = info.get(TOKEN_EMBEDDINGS)
        token_embeddings = None if tokens is None else TokenEmbeddings(
            tokens["identifier"], tokens["tokens"], local[TOKEN_EMBEDDINGS])
        return cls(component=info["component"], sections=sections, base_model=info["base_model"],
                   difftune_version=info["difftune_version"], format_version=info["format_version"],
                   source=source, token_embeddings=token_embeddings, experts=tuple(info.get(EXPERTS, {})),
                   base_adapters=list(info.get(BASE_ADAPTERS, [])))

    validate = staticmethod(check_header)
    fingerprint = staticmethod(fingerprint)
