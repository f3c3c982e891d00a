"""SaRA as a difftune adapter: re-train the small-magnitude entries of the base weights.

SaRA is not a layer wrapper: it trains entries of the base weights in place, through
`difftune.sparse_backprop` (1-D fp32 deltas, written into the weights, 1-D
gradients). The weights therefore always hold ``W0 + α·Δ`` at the selected entries
(merged is SaRA's natural state); ``merge`` only stops gradients from flowing,
``remove`` writes W0 back exactly, ``unload`` keeps the trained weights.

This class holds the adapter's state and decides when things happen; the math is in
`functional` (decay, progressive freeze, the low-rank subgradient), the selection in
`selection`, files (save, load, combine) in `files`.

Decisions where the paper is silent (ours), documented in docs/methods/sara.md:
- the trainable tensor is the delta Δ = W − W0 (starts at 0): files hold exact deltas,
  so a loaded adapter reproduces the trained weights bit for bit at α = 1;
- weight decay acts on the absolute values W0 + Δ of the still-trained entries, as in
  the paper's AdamW, applied after each optimizer step that ran (the trainer says which,
  `finish_optimizer_step`; the optimizer group gets 0):
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

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...adapter_file import AdapterSection
from ...errors import DifftuneError
from ...sparse_backprop import SparseBackprop, SparseEntries
from ..base import Adapter
from . import files
from . import functional as sf
from .config import SaraConfig
from .functional import auto_learning_rate
from .low_rank import is_eligible, sample_matrices
from .selection import (
    budget_to_count,
    pack_bits,
    select_entries,
    targeted_tensors,
    threshold_for_count,
    unpack_bits,
)

logger = logging.getLogger(__name__)

__all__ = ["SaraAdapter", "auto_learning_rate"]


class SaraAdapter(Adapter):
    method = "sara"
    config_class = SaraConfig
    supported_layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    supported_description = "Linear and Conv layers (biases and norms through include_bias_norm)"
    quantized_base_refusal = ("SaRA trains the base weights themselves (its trained values are written into "
                              "W0), so they must stay in a float dtype; use --mixed_precision bf16 to halve "
                              "their memory")
    fsdp_refusal = "SaRA trains entries of the base weights themselves, which FSDP shards"
    writes_base_tensors = True  # W0 + scale·Δ at its entries; stacked SaRA adapters add theirs
    budget_option = "budget"

    config: SaraConfig

    def __init__(self, model: nn.Module, config: SaraConfig, modules: dict[str, nn.Module]):
        super().__init__(model, config, modules)
        self.threshold = sf.float32(config.threshold)
        self.thresholds: dict[str, float] = {}  # per tensor, only for merged files
        self.weight_decay = 0.0
        self.stage = 0  # 1 once the progressive adjustment has run
        self.draws = 0  # low-rank draws so far (one per optimizer step)
        self._rank_cache: tuple[Any, list[tuple[SparseEntries, torch.Tensor]], float] | None = None
        self._merged_state = False

    # --- selection ---------------------------------------------------------------------

    @classmethod
    def weightless_parameter_count(cls, model: nn.Module, config: SaraConfig,
                                   modules: dict[str, nn.Module]) -> int | None:
        """A budget fixes the count without weights (θ is then its quantile); a threshold needs them."""
        if config.budget is None:
            raise DifftuneError("sara with a threshold selects by the weights' magnitudes: give a 'budget' "
                                "or count on a real model")
        tensors = targeted_tensors(model, modules, config.include_bias_norm)
        return budget_to_count(config.budget, sum(t.numel() for t in tensors.values()))

    @classmethod
    def frozen_buffer_bytes(cls, layers: list[nn.Linear], trainable: int) -> int:
        """The int32 index of the selected entries."""
        return 4 * trainable

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
        self.sparse = SparseBackprop(self.model, selection, weight_gradients=self.config.weight_gradients)
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

    @torch.no_grad()
    def merged_and_base_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight holds W0 + scale·Δ at the selected entries (merged or not): it is the merged
        value; the base is a copy with W0 written back there."""
        entries = self.entries.get(name)
        if entries is None:
            return None
        entries.sync()
        merged = entries.weight.detach()
        base = merged.clone()
        entries.write(base, entries.base.to(base.dtype))
        return merged, base

    # --- files (`files`) -----------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return files.file_tensors(self.entries)

    def file_metadata(self) -> dict[str, Any]:
        return files.file_extra(self.entries, self.threshold, self.thresholds, self.stage == 1)

    def check_file_metadata(self, extra: dict[str, Any], source: str) -> None:
        files.SaraFileFacts.from_extra(extra, source)

    def check_file_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """SaRA's file tensors depend on the stored masks, not on this adapter's selection
        (`files.check_file_tensors`)."""
        files.check_file_tensors(tensors, None, source)

    def attach_from_file(self, modules: dict[str, nn.Module], section: AdapterSection, source: str) -> None:
        """Select exactly the file's masks, each checked against |W0| < θ on this base: no mask is
        computed from the config, and the deltas are attached once."""
        facts = files.SaraFileFacts.from_extra(section.extra, source)
        selection, deltas = files.read_selection(self.model, section.tensors, facts, source)
        # in the order `attach` selects (the optimizer's parameter order on a resume)
        targeted = targeted_tensors(self.model, modules, self.config.include_bias_norm)
        order = {key: i for i, key in enumerate(targeted)}
        self._attach_selection(dict(sorted(selection.items(), key=lambda kv: order.get(kv[0], len(order)))))
        self._load(facts, deltas)

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor], source: str,
                          extra: dict[str, Any] | None = None) -> None:
        """A checkpoint (or file) into this attached adapter; ``extra`` None: its own θ apply. A
        file whose masks differ from the current selection (by rounding only, else refused) is
        selected instead."""
        if extra is None:
            facts = dataclasses.replace(files.SaraFileFacts.from_extra(self.file_metadata(), source),
                                        selected=None)
        else:
            facts = files.SaraFileFacts.from_extra(extra, source)
        current = {key: e.index.cpu() for key, e in self.entries.items()}
        selection, deltas = files.read_selection(self.model, tensors, facts, source, current)
        if selection.keys() != self.entries.keys() or any(
                not torch.equal(self.entries[k].index.cpu(), v) for k, v in selection.items()):
            self.sparse.detach(restore_base=True)  # only a checkpoint made on other rounding
            self._attach_selection(selection)
        self._load(facts, deltas)

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.load_file_tensors(tensors, source)

    @torch.no_grad()
    def _load(self, facts: files.SaraFileFacts, deltas: dict[str, torch.Tensor]) -> None:
        self.threshold, self.thresholds = facts.threshold, dict(facts.thresholds)
        for key, e in self.entries.items():
            e.delta.copy_(deltas[key])
        self.sparse.sync()

    @classmethod
    def combine_files(cls, sections: list[AdapterSection], scales: list[float],
                      sources: list[str]) -> AdapterSection:
        return files.combine_sections(sections, scales, sources)

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

    def mark_merged(self, merged: bool) -> None:
        """Merged with others: the weights hold everyone's update (its own included, as always), so
        they are taken as they are now and the deltas get no gradient."""
        self.sparse.mark_written()  # before anything reads them: they are not to be rewritten
        self.sparse.set_routing(not merged)
        self._merged_state = merged

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
            picked, norm = sf.rank_subgradient(e.values(scale=1.0), e.index, e.shape, e.frozen, e.delta.dtype)
            gradients.append((e, picked))
            value += norm
        return gradients, value

    def after_optimizer_step(self, step: int, max_steps: int, optimizer: Any) -> None:
        """For loops of one's own: the step counts as run unless the optimizer is accelerate's and
        says it skipped (the trainer calls `finish_optimizer_step` and says so itself)."""
        self.finish_optimizer_step(step, max_steps, optimizer,
                                   stepped=not getattr(optimizer, "step_was_skipped", False))

    def finish_optimizer_step(self, step: int, max_steps: int, optimizer: Any, stepped: bool) -> None:
        """Decay the trained values and, at its step, run the progressive adjustment; a skipped
        optimizer step (``stepped`` False) does neither: nothing was updated."""
        groups = self._our_groups(optimizer)
        if any(float(group.get("weight_decay", 0.0)) for group, _ in groups) \
                and self.config.progressive_step:
            raise DifftuneError(
                "sara: the optimizer decays the SaRA deltas itself (weight_decay > 0 in their "
                "parameter group), which would move the entries progressive adjustment freezes. "
                "Build the optimizer from adapter.optimizer_parameter_groups(weight_decay): SaRA "
                "then applies the decay to the trained values itself.")
        if stepped:
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

    def _decay(self, groups: list[tuple[dict[str, Any], list[SparseEntries]]]) -> None:
        """Decoupled weight decay on the absolute values W0 + Δ of the trained entries."""
        if self.weight_decay == 0:
            return
        for group, entries in groups:
            rate = float(group["lr"]) * self.weight_decay
            for e in entries:
                sf.decay_(e.delta, e.base, e.frozen, rate)

    @torch.no_grad()
    def progressive_adjust(self, optimizer: Any | None = None) -> int:
        """M ← M ∧ (|W| < θ): freeze the entries that grew past θ at their trained values.

        Survivors keep their optimizer moments; the frozen entries' moments are zeroed
        (`functional.zero_moments_`). Returns how many froze.
        """
        state = getattr(optimizer, "state", {}) if optimizer is not None else {}
        frozen_now = 0
        for key, e in self.entries.items():
            leave = sf.grown_entries(e.values(scale=1.0), self.threshold_of(key), e.frozen)
            e.set_frozen(leave)
            frozen_now += int(leave.sum())
            if e.delta in state:
                sf.zero_moments_(state[e.delta], leave)
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
        if (sf.float32(state["sara.threshold"]) != self.threshold
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
