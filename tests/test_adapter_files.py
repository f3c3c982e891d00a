"""Adapter files: save → fresh pipeline → identical images, diffusers interop, refusals."""

import copy
import json

import pytest
import torch
from conftest import build, denoise, denoiser_inputs, generate, method_cases, randomize_adapter
from safetensors import safe_open
from safetensors.torch import save_file

import difftune
from difftune.api import find_denoiser
from difftune.families import FAMILIES


def cases():
    return method_cases("files")


def trained(family: str, method: str, targets: str, options: dict, tmp_path):
    pipe = build(family)
    model, _ = find_denoiser(pipe)
    difftune.add_adapter(model, method, targets=targets, **options)
    randomize_adapter(model)
    path = difftune.save_adapter(model, tmp_path / "run")
    return pipe, path


@pytest.mark.parametrize(("method", "targets", "options"), cases())
def test_saved_adapter_reproduces_images_in_a_fresh_pipeline(family, method, targets, options, tmp_path):
    pipe, path = trained(family, method, targets, options, tmp_path)
    assert path.name == "adapter.safetensors"
    images = generate(pipe)
    base_images = generate(build(family))
    assert abs(images - base_images).max() > 1e-3

    fresh = build(family)
    difftune.load_adapter(fresh, path)
    assert abs(generate(fresh) - images).max() == 0
    difftune.set_adapter_scale(fresh, 0.0)
    assert abs(generate(fresh) - base_images).max() == 0


@pytest.mark.parametrize(("method", "targets", "options"), method_cases("files", first_only=True))
def test_resume_from_saved_adapter_and_optimizer_continues_exactly(method, targets, options, tmp_path):
    """Training 4 steps equals 2 steps, save (adapter file + optimizer state), fresh model, 2 steps."""
    def train(model, optimizer, inputs, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            model(**inputs, return_dict=False)[0].square().mean().backward()
            optimizer.step()

    pipe = build("sd")
    inputs = denoiser_inputs(pipe)
    difftune.add_adapter(pipe.unet, method, targets=targets, **options)
    optimizer = torch.optim.AdamW(difftune.trainable_parameters(pipe.unet), lr=1e-2)
    train(pipe.unet, optimizer, inputs, 2)
    path = difftune.save_adapter(pipe.unet, tmp_path / "checkpoint")
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    train(pipe.unet, optimizer, inputs, 2)

    resumed = build("sd")
    difftune.load_adapter(resumed, path)
    resumed_optimizer = torch.optim.AdamW(difftune.trainable_parameters(resumed.unet), lr=1e-2)
    resumed_optimizer.load_state_dict(optimizer_state)
    train(resumed.unet, resumed_optimizer, inputs, 2)
    expected = dict(difftune.named_trainable_parameters(pipe.unet))
    got = dict(difftune.named_trainable_parameters(resumed.unet))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_metadata_records_method_config_targets_fingerprint(tmp_path):
    pipe, path = trained("sd", "lora", "attn", {"rank": 4, "alpha": 8.0}, tmp_path)
    info = difftune.read_adapter_info(path)
    assert info["method"] == "lora"
    assert info["config"]["rank"] == 4 and info["config"]["alpha"] == 8.0
    assert info["config"]["targets"] == "attn"
    assert info["difftune_version"] == difftune.__version__
    assert info["component"] == "unet"
    assert set(info["targets"]) == {n for n in info["fingerprint"]["shapes"]}
    assert info["fingerprint"]["class"] == "UNet2DConditionModel"
    name = info["targets"][0]
    assert info["fingerprint"]["shapes"][name] == list(pipe.unet.get_submodule(name).weight.shape)


@pytest.mark.parametrize("targets", ["attn", ["attn", "conv"], "all"])
def test_lora_file_loads_with_diffusers_load_lora_weights(family, targets, tmp_path):
    if not FAMILIES[family].diffusers_loads_lora:
        pytest.skip("diffusers has no LoRA loader for this family's pipeline")
    unet = "conv" in FAMILIES[family].target_terms
    if not unet and targets == ["attn", "conv"]:
        pytest.skip("the DiT has no conv layers")
    if unet and targets == "all":
        pytest.skip("'all' is covered on the UNets by attn+conv")
    if family in ("sd3", "pixart") and targets == "all":
        pytest.skip("'all' on these DiTs is covered by FLUX.1 and Wan")
    pipe, path = trained(family, "lora", targets, {"rank": 4, "alpha": 8.0}, tmp_path)
    images = generate(pipe)
    fresh = build(family)
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    assert abs(generate(fresh) - images).max() < 1e-5
    fresh.set_adapters(["default_0"], adapter_weights=[0.0])
    assert abs(generate(fresh) - generate(build(family))).max() < 1e-5


def test_wrong_base_model_is_refused_naming_the_module(tmp_path):
    _, path = trained("sd", "lora", "attn", {"rank": 4}, tmp_path)
    other = build("sdxl")  # also a UNet2DConditionModel, other layout
    with pytest.raises(difftune.BaseModelMismatchError, match=r"adapter\.safetensors.*module '.*'"):
        difftune.load_adapter(other, path)
    assert not difftune.has_adapter(other.unet)
    with pytest.raises(difftune.BaseModelMismatchError, match="trained on a UNet2DConditionModel"):
        difftune.load_adapter(build("sd3"), path)


def test_config_difference_with_matching_shapes_only_warns(tmp_path):
    _, path = trained("sd", "lora", "attn", {"rank": 4}, tmp_path)
    fresh = build("sd")
    fresh.unet.register_to_config(sample_size=48)
    with pytest.warns(UserWarning, match="config differs"):
        difftune.load_adapter(fresh, path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickle_files_are_refused_without_being_read(suffix, tmp_path):
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(b"not even read")
    with pytest.raises(difftune.AdapterFileError, match=f"refusing a pickle-based file \\({suffix}\\)"):
        difftune.load_adapter(build("sd"), path)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    _, path = trained("sd", "lora", "attn", {"rank": 4}, tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    for bad in (truncated, corrupt):
        fresh = build("sd")
        with pytest.raises(difftune.AdapterFileError, match=bad.name):
            difftune.load_adapter(fresh, bad)
        assert not difftune.has_adapter(fresh.unet)


def test_plain_safetensors_without_metadata_is_refused_with_a_hint(tmp_path):
    # a whole LoRA of another tool is imported (tests/export/test_export.py), anything else refused
    path = tmp_path / "foreign.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(difftune.AdapterFileError, match="'unet.x.lora_A.weight' has no up factor"):
        difftune.load_adapter(build("sd"), path)
    save_file({"unet.x.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(difftune.AdapterFileError, match="neither a difftune adapter .* nor a LoRA file"):
        difftune.load_adapter(build("sd"), path)
    # reading a LoRA file of another tool as a difftune file says how to load it
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2), "unet.x.lora_B.weight": torch.zeros(2, 2)},
              str(path))
    with pytest.raises(difftune.AdapterFileError, match="not a difftune adapter.*load_lora_weights"):
        difftune.read_adapter_info(path)


def test_missing_file_and_folder_without_adapter(tmp_path):
    with pytest.raises(difftune.AdapterFileError, match="no such adapter file"):
        difftune.load_adapter(build("sd"), tmp_path / "nope.safetensors")
    with pytest.raises(difftune.AdapterFileError, match="folder has no adapter.safetensors"):
        difftune.load_adapter(build("sd"), tmp_path)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    pipe, path = trained("sd", "lora", "attn", {"rank": 4}, tmp_path)
    good = path.read_bytes()
    from difftune import adapter_file

    class FailingFile:  # writes the header, then the disk is full
        def __init__(self, name, mode):
            self.handle, self.calls = open(name, mode), 0  # noqa: SIM115 (closed by __exit__)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.calls += 1
            if self.calls > 2:
                raise OSError("disk full")
            return self.handle.write(data)

    monkeypatch.setattr(adapter_file, "open", FailingFile, raising=False)
    with pytest.raises(OSError, match="disk full"):
        difftune.save_adapter(pipe.unet, path)
    assert path.read_bytes() == good, "a failed save must not damage the previous file"
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]


def test_lora_header_carries_diffusers_metadata(tmp_path):
    _, path = trained("sd", "lora", "attn", {"rank": 4, "alpha": 8.0}, tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        keys = list(handle.keys())
    lora_meta = json.loads(header["lora_adapter_metadata"])
    assert lora_meta["unet.r"] == 4 and lora_meta["unet.lora_alpha"] == 8.0
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)


def test_denoiser_of_a_model_and_of_a_pipeline():
    pipe = build("sd3")
    assert find_denoiser(pipe) == (pipe.transformer, "transformer")
    assert find_denoiser(pipe.transformer) == (pipe.transformer, "transformer")
    inputs = denoiser_inputs(pipe)
    assert denoise(pipe, inputs).shape == inputs["hidden_states"].shape


def test_an_adapter_holding_nan_or_inf_is_not_saved(tmp_path):
    pipe, path = trained("sd", "lora", "attn", {"rank": 4}, tmp_path)
    good = path.read_bytes()
    with torch.no_grad():
        difftune.trainable_parameters(pipe.unet)[3][0, 0] = float("nan")
    with pytest.raises(difftune.DifftuneError, match=r"adapter.safetensors: not saved: adapter tensor "
                                                     r"'unet\..*lora_.*' holds NaN or inf values"):
        difftune.save_adapter(pipe.unet, path)
    assert path.read_bytes() == good


def _rewrite(path, target, edit_info=None, edit_tensors=None):
    """A copy of an adapter file with its difftune header entry and/or tensors changed."""
    from safetensors.torch import load_file, save

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    info = json.loads(metadata["difftune"])
    tensors = load_file(str(path))
    if edit_info:
        edit_info(info)
    if edit_tensors:
        edit_tensors(tensors)
    target.write_bytes(save(tensors, metadata={**metadata, "difftune": json.dumps(info)}))
    return target


def test_a_flipped_data_byte_is_caught_by_the_checksum_and_older_files_without_one_load(tmp_path):
    pipe, path = trained("sd", "lora", "attn", {"rank": 4}, tmp_path)
    expected = {k: v.clone() for k, v in difftune.get_adapter(pipe.unet).adapter_state_dict().items()}
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # the low bits of a weight: safetensors reads it without complaint
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    fresh = build("sd")
    with pytest.raises(difftune.AdapterFileError, match=r"flipped.safetensors: tensors or header do not "
                                                        r"match the checksum in the header \('sha256'\)"):
        difftune.load_adapter(fresh, flipped)
    assert not difftune.has_adapter(fresh.unet)
    edited = _rewrite(path, tmp_path / "alpha.safetensors", lambda info: info["config"].update(alpha=64.0))
    with pytest.raises(difftune.AdapterFileError, match="do not match the checksum"):
        difftune.load_adapter(fresh, edited)
    older = _rewrite(path, tmp_path / "older.safetensors", lambda info: info.pop("sha256"))
    loaded = difftune.load_adapter(fresh, older).adapter_state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


@pytest.mark.parametrize(("edit", "message"), [
    (lambda info: info.pop("fingerprint"), "header field 'fingerprint' is missing"),
    (lambda info: info.pop("method"), "header field 'method' is missing"),
    (lambda info: info.update(method=None), "header field 'method' must be a string, got null"),
    (lambda info: info.update(format_version="1"), "header field 'format_version' must be an integer"),
    (lambda info: info.update(format_version=True), "header field 'format_version' must be an integer"),
    (lambda info: info.update(targets="to_q"), "header field 'targets' must be a list"),
    (lambda info: info.update(targets=[]), "header field 'targets' must be a non-empty list"),
    (lambda info: info["fingerprint"].pop("shapes"), "header field 'fingerprint.shapes' is missing"),
    (lambda info: info["fingerprint"]["shapes"].update(x="3x3"), "'fingerprint.shapes.x' must be a list"),
    (lambda info: info["config"].update(rank="4"), "'config': lora option 'rank' must be a positive integer"),
    (lambda info: info["config"].update(dropout="0.1"), "option 'dropout' of method 'lora' must be float"),
    (lambda info: info["config"].update(bogus=1), r"'config': unknown option\(s\) for method 'lora': bogus"),
    (lambda info: info.update(method="lokr"), "'method'/'config': unknown adapter method 'lokr'"),
])
def test_a_damaged_header_is_refused_naming_the_field(tmp_path, edit, message):
    _, path = trained("sd", "lora", "attn", {"rank": 4}, tmp_path)
    damaged = _rewrite(path, tmp_path / "damaged.safetensors",
                       lambda info: (info.pop("sha256"), edit(info)))  # as an older file would be
    fresh = build("sd")
    with pytest.raises(difftune.AdapterFileError, match=f"damaged.safetensors: .*{message}"):
        difftune.load_adapter(fresh, damaged)
    assert not difftune.has_adapter(fresh.unet)


def _drop_first_lora_b(tensors):
    del tensors[sorted(k for k in tensors if "lora_B" in k)[0]]


def _first_lora_a(tensors, change):
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[key] = change(tensors[key])


@pytest.mark.parametrize(("edit", "message"), [
    (_drop_first_lora_b, r"adapter tensors do not fit the model: missing \['.*lora_B"),
    (lambda t: t.clear(), "the file holds no tensors"),
    (lambda t: _first_lora_a(t, lambda v: v.to(torch.int32)), "has dtype int32, expected a float"),
    (lambda t: _first_lora_a(t, lambda v: v.bool()), "has dtype bool, expected a float"),
    (lambda t: _first_lora_a(t, lambda v: v[:-1]), r"lora_A.weight' has shape \[3, 32\], expected \[4, 32\]"),
    (lambda t: _first_lora_a(t, lambda v: v.index_fill(0, torch.tensor([0]), float("nan"))),
     "lora_A.weight' holds NaN or inf values"),
])
def test_damaged_lora_tensors_are_refused_naming_the_tensor(tmp_path, edit, message):
    _, path = trained("sd", "lora", "attn", {"rank": 4}, tmp_path)
    _assert_tensor_edit_refused(path, tmp_path, edit, f".*{message}")


def _assert_tensor_edit_refused(path, tmp_path, edit, message):
    """The file with ``edit`` applied to its tensors (checksum dropped, as in an older file) is
    refused naming it, and the fresh pipeline keeps no adapter."""
    damaged = _rewrite(path, tmp_path / "damaged.safetensors", lambda info: info.pop("sha256"), edit)
    fresh = build("sd")
    with pytest.raises(difftune.AdapterFileError, match=f"damaged.safetensors: {message}"):
        difftune.load_adapter(fresh, damaged)
    assert not difftune.has_adapter(fresh.unet)


def test_a_sara_file_missing_delta_mask_pairs_or_with_a_cast_delta_is_refused(tmp_path):
    _, path = trained("sd", "sara", "all", {"budget": 0.05}, tmp_path)

    def drop_pair(tensors):
        key = sorted(k for k in tensors if k.endswith(".sara_delta"))[0].removesuffix(".sara_delta")
        for name in [k for k in tensors if k.rpartition(".")[0] == key]:
            del tensors[name]

    def cast_delta(tensors):
        key = sorted(k for k in tensors if k.endswith(".sara_delta"))[0]
        tensors[key] = tensors[key].double()

    cases = [(drop_pair, r"the file holds \d+ SaRA deltas, its header \('extra.selected'\) says \d+"),
             (cast_delta, "tensor '.*sara_delta' must be a 1-D float32 tensor, got float64")]
    for edit, message in cases:
        _assert_tensor_edit_refused(path, tmp_path, edit, message)


def test_special_files_are_named_as_such(tmp_path):
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(difftune.AdapterFileError, match="not a regular file"):
            difftune.load_adapter(build("sd"), path)


def test_identical_adapters_give_byte_identical_files_with_sorted_metadata(tmp_path):
    pipe, path = trained("sd", "lora", "attn", {"rank": 4, "alpha": 8.0}, tmp_path)
    again = difftune.save_adapter(pipe.unet, tmp_path / "again")
    assert again.read_bytes() == path.read_bytes()
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    info = header["__metadata__"]["difftune"]
    assert info == json.dumps(json.loads(info), sort_keys=True)


def test_outputs_honour_the_umask(tmp_path):
    import os
    import stat

    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            _, path = trained("sd", "lora", "attn", {"rank": 2}, tmp_path / f"u{umask:o}")
        finally:
            os.umask(old)
        assert stat.S_IMODE(path.stat().st_mode) == mode, oct(umask)


def test_a_full_disk_at_save_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    from difftune import adapter_file

    pipe, path = trained("sd", "lora", "attn", {"rank": 2}, tmp_path)

    def disk_full(name, mode):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_file, "open", disk_full, raising=False)
    with pytest.raises(difftune.DifftuneError, match="adapter.safetensors: cannot write: No space left on"):
        difftune.save_adapter(pipe.unet, path)
    assert [p.name for p in path.parent.iterdir()] == ["adapter.safetensors"]


def test_a_load_resolves_the_path_looks_up_the_method_and_checks_the_config_once(tmp_path, monkeypatch):
    from collections import Counter

    from difftune import adapter_file, api
    from difftune.tuners.lora import LoraConfig

    pipe, path = trained("sd", "lora", "attn", {"rank": 4, "alpha": 8.0}, tmp_path)
    inputs = denoiser_inputs(pipe)
    expected = denoise(pipe, inputs)
    calls = Counter()

    def counted(owner, name, label):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.update([label]) or original(*a, **k))

    counted(api, "resolve_adapter_path", "resolve")
    counted(adapter_file, "resolve_adapter_path", "resolve")
    counted(api, "get_method", "get_method")
    counted(LoraConfig, "validate", "validate")
    fresh = build("sd")
    difftune.load_adapter(fresh, path.parent)  # a folder: resolved to its adapter.safetensors
    assert calls == {"resolve": 1, "get_method": 1, "validate": 1}
    assert torch.equal(denoise(fresh, inputs), expected)


def test_adapter_file_round_trips_its_sections(tmp_path):
    """AdapterFile.read gives back what save_adapter wrote: header fields, sections, tensors."""
    from difftune.adapter_file import AdapterFile

    pipe, path = trained("sd", "svfit", "attn", {"rank": 3}, tmp_path)
    adapter = difftune.get_adapter(pipe)
    file = AdapterFile.read(path.parent)
    assert file.component == "unet" and not file.text_encoders and file.source == str(path)
    assert file.header() == {k: v for k, v in difftune.read_adapter_info(path).items() if k != "sha256"}
    section = file.main
    assert section.method == "svfit" and section.config == adapter.config.to_dict()
    assert section.targets == adapter.target_names and section.extra == adapter.file_metadata()
    assert section.shapes == {n: list(pipe.unet.get_submodule(n).weight.shape) for n in adapter.target_names}
    state = adapter.adapter_state_dict()
    assert section.tensors.keys() == state.keys()
    assert all(torch.equal(section.tensors[k], state[k]) for k in state)
    assert file.write(tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


# --- a damaged difftune file is checked as one; options in the trainer's ranges only -------------

def _default_file(method, tmp_path):
    """A file of ``method`` with its default options and random weights."""
    targets = {"sara": "all"}.get(method, "attn")
    options = {"svfit": {"rank": 2}, "sara": {"budget": 0.05}}.get(method, {})
    return trained("sd", method, targets, options, tmp_path)[1]


def _with_header(path, target, edit_metadata):
    """A copy of ``path`` whose safetensors header entries are edited as a whole."""
    from safetensors.torch import load_file, save

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    target.write_bytes(save(load_file(str(path)), metadata=edit_metadata(metadata)))
    return target


def _renamed(metadata, key):
    metadata[key] = metadata.pop("difftune")
    return metadata


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
@pytest.mark.parametrize(("name", "edit"), [
    ("key bit flip", lambda m: _renamed(m, "diffuune")),
    ("key case", lambda m: _renamed(m, "Difftune")),
    ("key cut", lambda m: _renamed(m, "difftun")),
    ("entry under another name", lambda m: _renamed(m, "notes")),
])
def test_a_difftune_file_with_a_damaged_marker_is_refused_not_imported(tmp_path, method, name, edit):
    """The checksum and every other field are intact: the file is still a difftune file, and damaged."""
    damaged = _with_header(_default_file(method, tmp_path), tmp_path / "damaged.safetensors", edit)
    fresh = build("sd")
    with pytest.raises(difftune.AdapterFileError, match=r"damaged.safetensors: a damaged difftune adapter "
                                                        r"\(header entry '.*'"):
        difftune.load_adapter(fresh, damaged)
    assert not difftune.has_adapter(fresh.unet)


def _float_options(method):
    import dataclasses
    import typing

    from difftune.tuners.base import _conforms

    config_class = difftune.METHODS[method].config_class
    hints = typing.get_type_hints(config_class)
    return [f.name for f in dataclasses.fields(config_class) if _conforms(0.5, hints[f.name])]


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_options_are_refused_by_the_loader_as_by_the_trainer(tmp_path, method, value):
    from difftune.adapter_file import CHECKSUM_FIELD, content_checksum
    from difftune.api import AdapterSpec

    path = _default_file(method, tmp_path)
    names = _float_options(method)
    assert names, f"{method} has no float option"
    for name in names:
        with pytest.raises(difftune.DifftuneError, match=f"{method} option '{name}' must be a finite number"):
            AdapterSpec(method, None, {name: value})  # what the trainer builds from its flags

        def edit(info, name=name):
            info["config"][name] = value
            info.pop(CHECKSUM_FIELD)

        def rehash(info, name=name):  # a checksum recomputed over the edited header
            from safetensors.torch import load_file

            edit(info, name)
            info[CHECKSUM_FIELD] = content_checksum(load_file(str(path)), info)

        for change in (edit, rehash):
            damaged = _rewrite(path, tmp_path / "nan.safetensors", change)
            fresh = build("sd")
            with pytest.raises(difftune.AdapterFileError,
                               match=f"nan.safetensors: .*{method} option '{name}' must be a finite number"):
                difftune.load_adapter(fresh, damaged)
            assert not difftune.has_adapter(fresh.unet)


@pytest.mark.parametrize("length", [0, 40])
def test_an_svfit_file_with_an_empty_or_too_long_tensor_is_refused_naming_it(tmp_path, length):
    path = _default_file("svfit", tmp_path)

    def resize(tensors):
        key = sorted(k for k in tensors if k.endswith(".svfit_sigma"))[0]
        for name in (key, key.replace("svfit_sigma", "svfit_s")):
            tensors[name] = torch.ones(length)

    _assert_tensor_edit_refused(path, tmp_path, resize, r"tensor '.*svfit_sigma' must be 1-D with 1 to 32 "
                                                         rf"values .*got shape \[{length}\]")
