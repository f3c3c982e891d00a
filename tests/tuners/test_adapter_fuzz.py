"""Damaged adapter files, fuzzed: each is refused with a DifftuneError or loads exactly the original.

Seeded mutations of a file of every registered method: truncation, byte flips in the header and in
the data, a wrong length field, junk in the metadata, missing tensors, wrong dtypes and shapes, NaN,
and edits of the markers that tell a difftune file from another tool's (the ``difftune`` entry's key
renamed or dropped, ``__metadata__`` dropped or its key flipped, diffusers' ``lora_adapter_metadata``
or the checksum dropped). Files keep their checksum (a current file damaged) or lose it first (an
older file: the schema and tensor checks must then refuse the structural damage on their own). A
mutation that escapes with another exception type, or loads weights or options other than the
original's, fails the test. Two marker edits leave a file that another tool may have written: a
LoRA without difftune's entry is imported as diffusers reads it (its own ``lora_adapter_metadata``
keeps the strength), and one without any header at all as a bare peft LoRA (alpha = rank, as
diffusers reads it too); both are checked against that reading.
"""

import json
import random
from collections import Counter, defaultdict

import pytest
import torch
from conftest import build, campaign_size, method_cases, randomize_adapter
from safetensors.torch import load_file, save

import difftune
from difftune.adapter_file import CHECKSUM_FIELD, METADATA_KEY
from difftune.errors import DifftuneError

MUTATIONS_PER_METHOD = campaign_size(250, 60)
JUNK_VALUES = [None, "x", "", 1, -1, 2.5, True, [], {}, [1, "a"], {"a": None}, 10**20]
MARKER_EDITS = ("key bit flip", "key case", "entry dropped", "no __metadata__", "__metadata__ key flip",
                "lora_adapter_metadata dropped", "format dropped", "checksum dropped")
IMPORTED, BARE = "imported as written", "bare tensors"  # outcomes of the marker edits a LoRA survives


def header_of(data: bytes) -> tuple[int, dict]:
    size = int.from_bytes(data[:8], "little")
    return size, json.loads(data[8:8 + size])


def rebuilt(tensors: dict, metadata: dict) -> bytes:
    return save(tensors, metadata=metadata)


def without_checksum(metadata: dict) -> dict:
    info = json.loads(metadata[METADATA_KEY])
    info.pop(CHECKSUM_FIELD)
    return {**metadata, METADATA_KEY: json.dumps(info)}


def mutate(data: bytes, tensors: dict, metadata: dict, rng: random.Random) -> tuple[str, bytes, bool]:
    """``(kind, damaged bytes, must_refuse)``; ``must_refuse`` when the damage is structural."""
    size, _ = header_of(data)
    kind = rng.choice(["truncate", "header byte", "data byte", "length field", "metadata junk",
                       "metadata extra key", "missing tensor", "wrong dtype", "wrong shape", "nan",
                       *["marker"] * 3])  # markers: several edits, each needs its share
    names = sorted(tensors)
    if kind == "marker":
        return marker_edit(data, tensors, metadata, rng)
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))], True
    if kind in ("header byte", "data byte"):
        start, end = (8, 8 + size) if kind == "header byte" else (8 + size, len(data))
        damaged = bytearray(data)
        position = rng.randrange(start, end)
        damaged[position] ^= 1 << rng.randrange(8)
        return kind, bytes(damaged), False  # a flip in padding or in a key's spelling may be harmless
    if kind == "length field":
        value = rng.choice([0, 1, size - 1, size + 1, size + 8, len(data), 2**63, rng.randrange(2**64)])
        return kind, value.to_bytes(8, "little") + data[8:], value != size
    if kind == "metadata junk":
        original = json.loads(metadata[METADATA_KEY])
        info = json.loads(metadata[METADATA_KEY])
        while info == original:  # a real change each time, never a no-op
            choice = rng.randrange(4)
            if choice == 0:
                info.pop(rng.choice(sorted(info)))
            elif choice == 1:
                info[rng.choice(sorted(info))] = rng.choice(JUNK_VALUES)
            elif choice == 2:
                nested = rng.choice([k for k in ("fingerprint", "config", "extra") if info[k]])
                info[nested][rng.choice(sorted(info[nested]))] = rng.choice(JUNK_VALUES)
            else:
                junk = rng.choice(["", "[]", "{", "null", "7"])
                return kind, rebuilt(tensors, {**metadata, METADATA_KEY: junk}), True
        # only dropping the checksum leaves a file that must load (as an older file would)
        return kind, rebuilt(tensors, {**metadata, METADATA_KEY: json.dumps(info)}), \
            set(original) - set(info) != {CHECKSUM_FIELD}
    if kind == "metadata extra key":  # unrelated header entries: loads, unchanged
        extra = {f"junk{rng.randrange(99)}": "x" * rng.randrange(50)}
        return kind, rebuilt(tensors, {**metadata, **extra}), False
    keep_checksum = rng.random() < 0.5
    meta = metadata if keep_checksum else without_checksum(metadata)
    changed = dict(tensors)
    name = rng.choice(names)
    if kind == "missing tensor":
        for gone in rng.sample(names, rng.randint(1, min(4, len(names) - 1))):
            del changed[gone]
    elif kind == "wrong dtype":
        dtype = rng.choice([torch.int32, torch.int64, torch.bool, torch.uint8, torch.float64, torch.int16])
        changed[name] = changed[name].to(dtype)
        if dtype == tensors[name].dtype or (dtype == torch.int64 and tensors[name].dtype == torch.int32
                                            and not keep_checksum):
            return kind, rebuilt(changed, meta), False  # unchanged, or SaRA's wider index type
    elif kind == "wrong shape":
        value = changed[name]
        changed[name] = torch.cat([value.reshape(-1), value.reshape(-1)[:1]]) if rng.random() < 0.5 \
            else value.reshape(-1)[:-1] if value.numel() > 1 else value.reshape(1, -1, 1)
    else:  # nan or inf
        value = changed[name].clone()
        if not value.is_floating_point():
            name = rng.choice([n for n in names if tensors[n].is_floating_point()])
            value = changed[name].clone()
        value.reshape(-1)[rng.randrange(value.numel())] = rng.choice([float("nan"), float("inf")])
        changed[name] = value
    return f"{kind} ({'checksum' if keep_checksum else 'no checksum'})", rebuilt(changed, meta), True


def marker_edit(data: bytes, tensors: dict, metadata: dict, rng: random.Random) -> tuple[str, bytes, bool]:
    """An edit of what marks the file kind; ``must_refuse`` False where the file may still load."""
    edit = rng.choice([e for e in MARKER_EDITS if e != "lora_adapter_metadata dropped"
                       or "lora_adapter_metadata" in metadata])  # always a real change
    kind = f"marker: {edit}"
    rest = {k: v for k, v in metadata.items() if k != METADATA_KEY}
    entry = metadata[METADATA_KEY]
    if edit == "key bit flip":
        position = rng.randrange(len(METADATA_KEY))
        key = METADATA_KEY[:position] + chr(ord(METADATA_KEY[position]) ^ 1 << rng.randrange(5)) \
            + METADATA_KEY[position + 1:]
        return kind, rebuilt(tensors, {**rest, key: entry}), True
    if edit == "key case":
        return kind, rebuilt(tensors, {**rest, METADATA_KEY.capitalize(): entry}), True
    if edit == "entry dropped":
        return kind, rebuilt(tensors, rest), False  # a LoRA keeps diffusers' header: imported as written
    if edit == "no __metadata__":
        return kind, rebuilt(tensors, None), False  # a bare LoRA: imported as bare tensors
    if edit == "__metadata__ key flip":
        size, _ = header_of(data)
        start = data.index(b'"__metadata__"', 8, 8 + size) + 1 + rng.randrange(len("__metadata__"))
        damaged = bytearray(data)
        damaged[start] ^= 1 << rng.randrange(5)
        return kind, bytes(damaged), True
    if edit == "checksum dropped":
        return kind, rebuilt(tensors, without_checksum(metadata)), False
    key = {"lora_adapter_metadata dropped": "lora_adapter_metadata", "format dropped": "format"}[edit]
    return kind, rebuilt(tensors, {k: v for k, v in metadata.items() if k != key}), False


def original_file(method: str, tmp_path):
    ((_, targets, options),) = [param.values for param in method_cases("fuzz") if param.values[0] == method]
    pipe = build("sd")
    difftune.add_adapter(pipe.unet, method, targets=targets, **options)
    randomize_adapter(pipe.unet)
    path = difftune.save_adapter(pipe.unet, tmp_path / method)
    adapter = difftune.get_adapter(pipe.unet)
    state = {k: v.detach().clone() for k, v in adapter.adapter_state_dict().items()}
    return path, state, adapter.config.to_dict()


def check_loaded(adapter, state: dict, config: dict, kind: str, trial: int) -> str:
    """What a loaded mutation gave, asserting it is the original (or, for a LoRA whose difftune entry
    or whole header is gone, what diffusers reads from the file); returns the outcome's name."""
    loaded = adapter.adapter_state_dict()
    assert loaded.keys() == state.keys(), f"trial {trial} ({kind})"
    assert all(torch.equal(loaded[k].cpu(), state[k]) for k in state), f"trial {trial} ({kind}): weights"
    if adapter.config.to_dict() == config:
        return "loaded the original"
    assert adapter.method == "lora" and kind in ("marker: entry dropped", "marker: no __metadata__"), \
        f"trial {trial} ({kind}): options {adapter.config.to_dict()}"
    assert adapter.config.rank == config["rank"], f"trial {trial} ({kind}): rank"
    if kind == "marker: entry dropped":  # diffusers' lora_adapter_metadata keeps the trained alpha
        assert adapter.config.effective_alpha == config["alpha"], f"trial {trial} ({kind}): alpha"
        return IMPORTED
    assert adapter.config.effective_alpha == config["rank"], f"trial {trial} ({kind}): alpha"
    return BARE


@pytest.mark.parametrize("method", [param.values[0] for param in method_cases("fuzz")])
def test_fuzzed_adapter_files_are_refused_or_load_exactly_the_original(method, tmp_path):
    path, state, config = original_file(method, tmp_path)
    data = path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    pipe = build("sd")
    untouched = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    rng = random.Random(f"fuzz-{method}")
    outcomes: Counter = Counter()
    kinds: dict[str, Counter] = defaultdict(Counter)
    for trial in range(MUTATIONS_PER_METHOD):
        kind, damaged, must_refuse = mutate(data, tensors, metadata, rng)
        target = tmp_path / f"m{trial}.safetensors"
        target.write_bytes(damaged)
        try:
            adapter = difftune.load_adapter(pipe, target)
        except DifftuneError as err:
            assert str(target) in str(err), f"{kind}: the message does not name the file: {err}"
            assert "\n" not in str(err), f"{kind}: not one line: {err}"
            assert not difftune.has_adapter(pipe.unet), f"{kind}: a refused file left an adapter"
            outcomes["refused"] += 1
            kinds[kind.split(" (")[0]]["refused"] += 1
            continue
        except Exception as err:  # any other type is what this test exists to catch
            pytest.fail(f"trial {trial} ({kind}) escaped as {type(err).__name__}: {err}")
        assert not must_refuse, f"trial {trial} ({kind}) was loaded"
        outcome = check_loaded(adapter, state, config, kind, trial)
        difftune.remove_adapter(pipe.unet)
        outcomes[outcome] += 1
        kinds[kind.split(" (")[0]][outcome] += 1
    assert all(torch.equal(v, untouched[k]) for k, v in pipe.unet.state_dict().items())
    assert outcomes["refused"] >= MUTATIONS_PER_METHOD // 2
    print(f"{method}: {MUTATIONS_PER_METHOD} mutations: {dict(outcomes)}; by kind: "
          + ", ".join(f"{k} {dict(v)}" for k, v in sorted(kinds.items())))
