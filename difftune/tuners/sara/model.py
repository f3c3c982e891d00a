"""SaRA as a difftune adapter: re-train the small-magnitude entries of the base weights.

SaRA is not a layer wrapper: it trains entries of the base weights in place, through
`difftune.sparse_backprop` (1-D fp32 deltas, written into the weights, 1-D
gradients). The weights therefore always hold ``W0 + α·Δ`` at the selected entries
(merged is SaRA's natural state); ``merge`` only stops gradients from flowing,
``remove`` writes W0 back exactly, ``unload`` keeps the trained weights.

Decisions where the paper is silent (ours), documented in the README:
- the trainable tensor is the delta Δ = W − W0 (starts at 0): files hold exact deltas,
  so a loaded adapter reproduces the trained weights bit for bit at α = 1;
- weight decay acts on the absolute values W0 + Δ of the still-trained entries, as in
  the paper's AdamW, applied in `after_optimizer_step` (the optimizer group gets 0):
  v ← (v − u)(1 − lr·wd) for the Adam update u, where torch's AdamW computes
  v(1 − lr·wd) − u; the two differ by lr·wd·u, a second-order term;
- the low-rank term is returned by `regularization_loss` as a tensor whose value is
  λ·‖W ⊙ M‖_* and whose gradient is λ·(U Vᵀ)[M], so loss scaling, gradient
  accumulation and DDP treat it like the rest of the loss; the decomposition runs once
  per optimizer step (cached while the weights do not change);
- progressive adjustment keeps every tensor's shape: entries that leave the set are
  frozen (zero gradient, their optimizer moments zeroed, no decay), survivors keep
  their moments, and the step's update is kept. Shapes never change, so optimizers,
  DDP buckets and checkpoints stay valid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import AdapterFileError, BaseModelMismatchError, DifftuneError
from ...sparse_backprop import SparseBackprop, SparseEntries, compact_index
from ..base import Adapter
from .config import SaraConfig
from .low_rank import is_eligible, nuclear_norm_subgradient, sample_matrices
from .selection import (
    budget_to_count,
    decode_mask,
    encode_mask,
    mask_disagreement,
    pack_bits,
    select_entries,
    targeted_tensors,
    threshold_for_count,
    unpack_bits,
)

logger = logging.getLogger(__name__)

DELTA_SUFFIX = "sara_delta"
MASK_SUFFIXES = {"sara_mask_index": "index", "sara_mask_bits": "bits"}


def auto_learning_rate(threshold: float) -> float:
    """The paper's rule when no learning rate is given: 1e-3·exp(−350·θ)."""
    return 1e-3 * math.exp(-350.0 * threshold)


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


class SaraAdapter(Adapter):
    method = "sara"
    config_class = SaraConfig
    supported_layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    supported_description = "Linear and Conv layers (biases and norms through include_bias_norm)"

    config: SaraConfig

    def __init__(self, model: nn.Module, config: SaraConfig, modules: dict[str, nn.Module]):
        super().__init__(model, config, modules)
        self.threshold = _float32(config.threshold)
        self.thresholds: dict[str, float] = {}  # per tensor, only for merged files
        self.weight_decay = 0.0
        self.stage = 0  # 1 once the progressive adjustment has run
        self.draws = 0  # low-rank draws so far (one per optimizer step)
        self._rank_cache: tuple[Any, list[tuple[SparseEntries, torch.Tensor]], float] | None = None
        self._merged_state = False
        self._last_optimizer_step: float | None = None
        self._file_extra: dict[str, Any] = {}

    # --- selection ---------------------------------------------------------------------

    def attach(self, modules: dict[str, nn.Module]) -> None:
        cfg = self.config
        tensors = targeted_tensors(self.model, modules, cfg.include_bias_norm)
        if cfg.budget is not None:
            total = sum(t.numel() for t in tensors.values())
            self.threshold = threshold_for_count(tensors.values(), budget_to_count(cfg.budget, total))
        selection = {key: select_entries(tensor, self.threshold) for key, tensor in tensors.items()}
        if not any(index.numel() for index in selection.values()):
            raise DifftuneError(
                f"sara: threshold {self.threshold:g} selects no entry of the {len(tensors)} targeted "
                "tensors; raise 'threshold' or give a 'budget' (a count or a fraction)")
        self._attach_selection(selection)

    def _attach_selection(self, selection: dict[str, torch.Tensor]) -> None:
        self.sparse = SparseBackprop(self.model, selection)
        self.eligible = [key for key, e in self.sparse.entries.items() if is_eligible(e.shape)]
        self._rank_cache = None

    @property
    def entries(self) -> dict[str, SparseEntries]:
        return self.sparse.entries

    @property
    def num_selected(self) -> int:
        return self.sparse.num_selected

    def mask_bytes(self) -> int:
        """Memory the masks take (indices, plus the frozen flags after progressive)."""
        frozen = sum(e.numel for e in self.entries.values() if e.frozen is not None)
        return self.sparse.index_bytes() + frozen

    def threshold_of(self, key: str) -> float:
        return self.thresholds.get(key, self.threshold)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.sparse.named_parameters()

    def changed_tensor_names(self) -> list[str]:
        # every selected tensor: biases and norms too with include_bias_norm
        return list(self.entries)

    # --- files -------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for key, e in self.entries.items():
            tensors[f"{key}.{DELTA_SUFFIX}"] = e.delta.detach().float()
            kind, data = encode_mask(e.index, math.prod(e.shape))
            tensors[f"{key}.sara_mask_{kind}"] = data
        return tensors

    def file_metadata(self) -> dict[str, Any]:
        first = next(iter(self.entries.values()))
        extra: dict[str, Any] = {
            "threshold": self.threshold,
            "selected": self.num_selected,
            "base_dtype": str(first.base.dtype).removeprefix("torch."),
            "progressive_applied": self.stage == 1,
            "frozen": sum(int(e.frozen.sum()) for e in self.entries.values() if e.frozen is not None),
        }
        if self.thresholds:
            extra["thresholds"] = dict(self.thresholds)
        return extra

    def check_file_metadata(self, extra: dict[str, Any], source: str) -> None:
        if "threshold" not in extra:
            raise AdapterFileError(f"{source}: SaRA file without 'threshold' metadata")
        self._file_extra = extra

    def check_file_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """SaRA's file tensors depend on the stored masks, not on this adapter's own selection:
        every delta pairs with one mask, deltas are 1-D float32, index masks 1-D int32/int64 and bit
        masks 1-D uint8, and together they hold the number of entries the header records (a file
        missing whole pairs would otherwise load as a smaller adapter)."""
        stored = _split_file_tensors(tensors, source)
        mask_dtypes = {"index": (torch.int32, torch.int64), "bits": (torch.uint8,)}
        for key, (kind, data, delta) in stored.items():
            suffix = f"sara_mask_{kind}"
            if data.dtype not in mask_dtypes[kind] or data.ndim != 1:
                raise AdapterFileError(f"{source}: tensor '{key}.{suffix}' must be a 1-D "
                                       f"{' or '.join(str(d)[6:] for d in mask_dtypes[kind])} tensor, got "
                                       f"{str(data.dtype)[6:]} of shape {list(data.shape)}")
            if delta.dtype != torch.float32 or delta.ndim != 1:
                raise AdapterFileError(f"{source}: tensor '{key}.{DELTA_SUFFIX}' must be a 1-D float32 "
                                       f"tensor, got {str(delta.dtype)[6:]} of shape {list(delta.shape)}")
        selected = self._file_extra.get("selected")
        if isinstance(selected, int) and not isinstance(selected, bool):
            found = sum(delta.numel() for _, _, delta in stored.values())
            if found != selected:
                raise AdapterFileError(f"{source}: the file holds {found} SaRA deltas, its header "
                                       f"('extra.selected') says {selected}: tensors are missing")

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        extra = self._file_extra
        file_threshold = float(extra.get("threshold", self.threshold))
        thresholds = {k: float(v) for k, v in extra.get("thresholds", {}).items()}
        parameters = dict(self.model.named_parameters())
        stored = _split_file_tensors(tensors, source)
        tolerance = max(torch.finfo(getattr(torch, extra.get("base_dtype", "float32"))).eps,
                        *(torch.finfo(e.base.dtype).eps for e in self.entries.values()))
        selection: dict[str, torch.Tensor] = {}
        deltas: dict[str, torch.Tensor] = {}
        for key, (kind, data, delta) in stored.items():
            param = parameters.get(key)
            if param is None:
                raise BaseModelMismatchError(f"{source}: the base model has no parameter '{key}' "
                                             "(the SaRA adapter trains entries of it)")
            try:
                index = decode_mask(kind, data, param.numel())
            except DifftuneError as err:
                raise AdapterFileError(f"{source}: mask of '{key}': {err}") from None
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= param.numel()
                                  or bool((index[1:] <= index[:-1]).any())):
                raise AdapterFileError(f"{source}: mask of '{key}' is not a sorted list of distinct "
                                       f"positions in 0..{param.numel() - 1}")
            if delta.numel() != index.numel():
                raise AdapterFileError(f"{source}: '{key}' has {delta.numel()} deltas for a mask of "
                                       f"{index.numel()} entries")
            current = self.entries.get(key)
            if current is None or not torch.equal(current.index.cpu(), index):
                threshold = thresholds.get(key, file_threshold)
                differing, unexplained = mask_disagreement(param, index, threshold, tolerance)
                if unexplained:
                    raise BaseModelMismatchError(
                        f"{source}: the SaRA mask of '{key}' does not match this base model: "
                        f"{unexplained} of {index.numel()} stored entries disagree with |W0| < "
                        f"{threshold:g} beyond rounding. The adapter was trained on other weights.")
                if differing:
                    logger.info("%s: %d mask entries of %s differ only by rounding", source, differing, key)
            selection[key] = index
            deltas[key] = delta
        if selection.keys() != self.entries.keys() or any(
                not torch.equal(self.entries[k].index.cpu(), v) for k, v in selection.items()):
            self.sparse.detach(restore_base=True)
            self._attach_selection(selection)
        self.threshold, self.thresholds = file_threshold, thresholds
        for key, e in self.entries.items():
            e.delta.copy_(deltas[key])
        self.sparse.sync()

    @classmethod
    def combine_files(
        cls, files: list[tuple[dict[str, torch.Tensor], dict[str, Any]]], scales: list[float],
        sources: list[str],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One SaRA file for Δ = Σ αᵢ·Δᵢ on the union of the masks.

        On one base model the masks are nested (|W0| < θ grows with θ), so the union of
        a tensor's masks is the mask at the largest θ of the files that hold it; that
        per-tensor θ is recorded so the combined mask is verified like any other.
        """
        combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        thresholds: dict[str, float] = {}
        for (tensors, info), scale, source in zip(files, scales, sources, strict=True):
            theta = float(info["extra"]["threshold"])
            per_tensor = info["extra"].get("thresholds", {})
            for key, (kind, data, delta) in _split_file_tensors(tensors, source).items():
                numel = data.numel() * 8 if kind == "bits" else int(data.max()) + 1  # padding bits are 0
                index = decode_mask(kind, data, numel).long()
                scaled = delta.float() * scale
                if key in combined:
                    old_index, old_delta = combined[key]
                    union = torch.unique(torch.cat([old_index, index]))
                    merged = torch.zeros(union.numel())
                    merged.index_add_(0, torch.searchsorted(union, old_index), old_delta)
                    merged.index_add_(0, torch.searchsorted(union, index), scaled)
                    combined[key] = (union, merged)
                else:
                    combined[key] = (index, scaled)
                thresholds[key] = max(thresholds.get(key, -1.0), float(per_tensor.get(key, theta)))
        out: dict[str, torch.Tensor] = {}
        for key, (index, delta) in combined.items():
            out[f"{key}.{DELTA_SUFFIX}"] = delta
            out[f"{key}.sara_mask_index"] = compact_index(index, int(index.max()) + 1)
        first_info = files[0][1]
        top = max(thresholds.values())
        info = dict(first_info)
        targets = list(dict.fromkeys(t for _, i in files for t in i["targets"]))
        info["targets"] = targets
        info["config"] = {**first_info["config"], "threshold": top, "budget": None,
                          "include_bias_norm": any(i["config"].get("include_bias_norm") for _, i in files)}
        info["fingerprint"] = {**first_info["fingerprint"], "shapes": {
            k: v for _, i in files for k, v in i["fingerprint"]["shapes"].items()}}
        info["extra"] = {**first_info["extra"], "threshold": top,
                         "thresholds": {k: v for k, v in thresholds.items() if v != top},
                         "merged_from": sources, "merge_scales": list(scales),
                         "selected": sum(delta.numel() for _, delta in combined.values())}
        return out, info

    # --- scale, merge, remove ------------------------------------------------------------

    def _apply_scale(self, scale: float) -> None:
        self.sparse.set_scale(scale)

    def _merge(self, keep_original: bool) -> None:
        self.sparse.set_routing(False)
        self._merged_state = True

    def _unmerge(self) -> None:
        self.sparse.set_routing(True)
        self._merged_state = False

    def _detach(self) -> None:
        self.sparse.detach(restore_base=not self._merged_state)
        self._merged_state = False

    # --- training hooks ------------------------------------------------------------------

    def default_learning_rate(self) -> float:
        return auto_learning_rate(self.threshold)

    def optimizer_parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """One group with weight_decay 0: SaRA decays the absolute values itself."""
        self.weight_decay = float(weight_decay)
        return [{"params": [p for _, p in self.named_trainable_parameters()], "weight_decay": 0.0}]

    def regularization_loss(self) -> torch.Tensor | None:
        """λ·‖W ⊙ M‖_* over this step's sampled matrices (value), gradient λ·(U Vᵀ)[M].

        Computed once per optimizer step (cached while the weights do not change).
        Calling it before the forward keeps the decomposition's temporaries (a few
        dense copies of one matrix) off the activation peak.
        """
        if self.config.lambda_rank == 0 or not self.eligible or self._merged_state:
            return None
        version = tuple(e.delta._version for e in self.entries.values())
        if self._rank_cache is None or self._rank_cache[0] != version:
            self._rank_cache = (version, *self._rank_subgradients(self.draws))
            self.draws += 1
        _, gradients, value = self._rank_cache
        lam = self.config.lambda_rank
        total = sum((g * e.delta).sum() for e, g in gradients)
        return lam * (total - total.detach() + value)

    @torch.no_grad()
    def _rank_subgradients(self, draw: int) -> tuple[list[tuple[SparseEntries, torch.Tensor]], float]:
        chosen = sample_matrices(self.eligible, self.config.rank_samples, draw, self.config.seed)
        gradients, value = [], 0.0
        for key in chosen:
            e = self.entries[key]
            values = e.values(scale=1.0)
            if e.frozen is not None:
                values.masked_fill_(e.frozen, 0.0)
            masked = torch.zeros(e.shape, dtype=torch.float32, device=values.device)
            masked.view(-1).index_put_((e.index,), values)
            subgradient, norm = nuclear_norm_subgradient(masked)
            picked = subgradient.reshape(-1).index_select(0, e.index).to(e.delta.dtype)
            if e.frozen is not None:
                picked.masked_fill_(e.frozen, 0.0)
            gradients.append((e, picked))
            value += norm
        return gradients, value

    def after_optimizer_step(self, step: int, max_steps: int, optimizer: Any) -> None:
        groups = self._our_groups(optimizer)
        if any(float(group.get("weight_decay", 0.0)) for group, _ in groups) \
                and self.config.progressive_step:
            raise DifftuneError(
                "sara: the optimizer decays the SaRA deltas itself (weight_decay > 0 in their "
                "parameter group), which would move the entries progressive adjustment freezes. "
                "Build the optimizer from adapter.optimizer_parameter_groups(weight_decay): SaRA "
                "then applies the decay to the trained values itself.")
        if self._optimizer_stepped(optimizer):
            self._decay(groups)
        at = self.config.progressive_at(max_steps)
        if at is not None and self.stage == 0 and step >= at:
            self.progressive_adjust(optimizer)
        self.sparse.sync()  # the weights are current after every step (state dicts, reads)

    def _our_groups(self, optimizer: Any) -> list[tuple[dict[str, Any], list[SparseEntries]]]:
        by_id = {id(e.delta): e for e in self.entries.values()}
        groups = []
        for group in optimizer.param_groups:
            mine = [by_id[id(p)] for p in group["params"] if id(p) in by_id]
            if mine:
                groups.append((group, mine))
        return groups

    def _optimizer_stepped(self, optimizer: Any) -> bool:
        """False when the optimizer skipped its step (fp16 overflow, accumulation)."""
        if getattr(optimizer, "step_was_skipped", False):
            return False
        state = getattr(optimizer, "state", {})
        for e in self.entries.values():
            step = state.get(e.delta, {}).get("step") if e.delta in state else None
            if step is not None:
                step = float(step)
                stepped = step != self._last_optimizer_step
                self._last_optimizer_step = step
                return stepped
        return True

    @torch.no_grad()
    def _decay(self, groups: list[tuple[dict[str, Any], list[SparseEntries]]]) -> None:
        """Decoupled weight decay on the absolute values W0 + Δ of the trained entries."""
        if self.weight_decay == 0:
            return
        for group, entries in groups:
            rate = float(group["lr"]) * self.weight_decay
            for e in entries:
                if e.frozen is None:  # Δ ← Δ − rate·(W0 + Δ), in place
                    e.delta.mul_(1.0 - rate).sub_(e.base.to(e.delta.dtype), alpha=rate)
                else:
                    decay = e.values(scale=1.0).mul_(rate).masked_fill_(e.frozen, 0.0)
                    e.delta.sub_(decay.to(e.delta.dtype))

    @torch.no_grad()
    def progressive_adjust(self, optimizer: Any | None = None) -> int:
        """M ← M ∧ (|W| < θ): freeze the entries that grew past θ at their trained values.

        Survivors keep their optimizer moments; the frozen entries' moments (any state
        tensor shaped like the delta) are zeroed so that, with a zero gradient and no
        decay, the optimizer leaves them exactly where they are. Returns how many froze.
        """
        state = getattr(optimizer, "state", {}) if optimizer is not None else {}
        frozen_now = 0
        for key, e in self.entries.items():
            values = e.values(scale=1.0)
            theta = self.threshold_of(key)
            leave = ~((values < theta) & (values > -theta))
            if e.frozen is not None:
                leave |= e.frozen
            e.set_frozen(leave)
            frozen_now += int(leave.sum())
            if e.delta in state:
                for tensor in state[e.delta].values():
                    if torch.is_tensor(tensor) and tensor.shape == e.delta.shape:
                        tensor.masked_fill_(leave, 0)
            if e.delta.grad is not None:
                e.delta.grad.masked_fill_(leave, 0.0)
        self.stage = 1
        self._rank_cache = None
        logger.info("sara progressive adjustment: %d of %d entries frozen, %d still trained",
                    frozen_now, self.num_selected, self.num_selected - frozen_now)
        return frozen_now

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "sara.stage": self.stage,
            "sara.draws": self.draws,
            "sara.threshold": self.threshold,
            "sara.selected": self.num_selected,
            "sara.weight_decay": self.weight_decay,
        }
        for key, e in self.entries.items():
            if e.frozen is not None:
                state[f"sara.frozen.{key}"] = pack_bits(e.frozen).cpu()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if (_float32(state["sara.threshold"]) != self.threshold
                or int(state["sara.selected"]) != self.num_selected):
            raise DifftuneError(
                f"sara: the checkpoint was made with θ={state['sara.threshold']:g} and "
                f"{int(state['sara.selected'])} selected entries, this adapter has θ={self.threshold:g} "
                f"and {self.num_selected}: resume with the same base model and SaRA options")
        self.stage = int(state["sara.stage"])
        self.draws = int(state["sara.draws"])
        self.weight_decay = float(state.get("sara.weight_decay", self.weight_decay))
        for key, e in self.entries.items():
            packed = state.get(f"sara.frozen.{key}")
            e.set_frozen(None if packed is None else unpack_bits(torch.as_tensor(packed), e.numel))
        self._rank_cache = None
        self._last_optimizer_step = None


def _split_file_tensors(tensors: dict[str, torch.Tensor], source: str
                        ) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """``{param key: (mask kind, mask data, delta)}`` from a SaRA file's tensors."""
    deltas: dict[str, torch.Tensor] = {}
    masks: dict[str, tuple[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        key, _, suffix = name.rpartition(".")
        if suffix == DELTA_SUFFIX:
            deltas[key] = value
        elif suffix in MASK_SUFFIXES:
            if key in masks:
                raise AdapterFileError(f"{source}: two masks for '{key}'")
            masks[key] = (MASK_SUFFIXES[suffix], value)
        else:
            raise AdapterFileError(f"{source}: unexpected tensor '{name}' in a SaRA file")
    if deltas.keys() != masks.keys():
        odd = sorted(deltas.keys() ^ masks.keys())
        raise AdapterFileError(f"{source}: SaRA deltas and masks do not pair up: {odd[:3]}")
    return {key: (*masks[key], deltas[key]) for key in deltas}

