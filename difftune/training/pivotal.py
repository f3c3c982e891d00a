"""Pivotal tuning: a new token embedding for the subject's identifier, trained with the adapter.

A small text encoder gives ``a sks red heart`` nearly the embedding of ``a red heart``
(``sks`` is a word it never learnt), so a denoiser fine-tune paints every red heart like
the subject. Pivotal tuning (textual inversion trained together with the adapter, as in
diffusers' advanced DreamBooth scripts) gives the identifier new tokens of its own whose
embeddings train with their own learning rate; every other token keeps its embedding.

The identifier becomes ``num_new_tokens`` added tokens in diffusers' multi-vector
textual-inversion convention: ``sks``, ``sks_1``, ``sks_2``, ... A diffusers pipeline
expands ``sks`` in a prompt to ``sks sks_1 ...`` itself (``maybe_convert_prompt``), so
prompts keep the plain identifier, in training and at inference. The trained rows are
saved in the adapter file as a ``token_embeddings.`` tensor section (one tensor per text
encoder) with the tokens named in the header; `difftune.load_adapter` adds them back
(`difftune.tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapter_file import TokenEmbeddings
from ..errors import DifftuneError
from ..families import titles_with
from ..options import CheckedSettings, at_least, matches, option, positive
from ..tokens import add_tokens, encoder_pairs, token_names

INIT_RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class TokenEmbeddingSettings(CheckedSettings):
    """The subject trainer's pivotal-tuning flags (the other fields apply with ``train_token_embedding``)."""

    flag_group: ClassVar[str] = "pivotal tuning (new identifier tokens)"

    train_token_embedding: bool = option(
        False, lambda: "give the identifier new tokens whose embeddings train with the adapter (pivotal "
                       f"tuning); saved in the adapter file ({titles_with('trainable_text_encoders')})")
    identifier: str = option("sks", "the identifier word of the instance prompt that becomes the new tokens",
                             check=matches(r"[a-z][a-z0-9]*", "one lowercase word"))
    num_new_tokens: int = option(2, "tokens the identifier becomes (diffusers' multi-vector names: sks, "
                                    "sks_1, ...)", check=at_least(1))
    token_embedding_lr: float = option(1e-2, "learning rate of the new token embeddings (1e-2 measured best "
                                             "of 1e-3, 1e-2, 3e-2 on builtin:embedded)", check=positive())
    token_embedding_init: str = option(INIT_RANDOM, "'random' (normal, at the mean norm of the vocabulary's "
                                                    "embeddings) or a word whose embedding every new token "
                                                    "starts from (e.g. the class word)")
    token_embedding_max_norm: float | None = option(None, "cap on each new embedding's norm, in multiples of "
                                                          "the vocabulary's mean norm (default: none)",
                                                    check=positive())


def mean_norm(encoder: nn.Module) -> float:
    """The mean norm of the encoder's token embeddings: the scale new ones start at (and are capped to)."""
    return encoder.get_input_embeddings().weight.detach().float().norm(dim=1).mean().item()


def initial_rows(tokenizer: Any, encoder: nn.Module, count: int, init: str, seed: int) -> torch.Tensor:
    """``count`` starting embeddings: normal at the vocabulary's mean norm, or a word's mean embedding."""
    weight = encoder.get_input_embeddings().weight.detach().float()
    if init == INIT_RANDOM:
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randn(count, weight.shape[1], generator=generator)
        return rows / rows.norm(dim=1, keepdim=True) * mean_norm(encoder)
    ids = tokenizer(init, add_special_tokens=False).input_ids
    if not ids:
        raise DifftuneError(f"--token_embedding_init {init!r}: the tokenizer gives no token for it")
    return weight[ids].mean(0).cpu().expand(count, -1).clone()


class TokenEmbeddingTraining:
    """New identifier tokens in every text encoder of a pipeline, their embeddings trainable.

    The embedding matrices stay frozen: a forward hook puts a trainable row in place of each
    new token's, so only those rows can change. `finish` writes them into the matrices. With
    ``max_norm`` a row longer than that many mean embedding norms is used scaled down to it.
    """

    def __init__(self, pipeline: Any, identifier: str, count: int, init: str, seed: int,
                 max_norm: float | None = None) -> None:
        self.tokens = token_names(identifier, count)
        self.identifier = identifier
        self.rows: dict[str, nn.Parameter] = {}
        self.ids: dict[str, list[int]] = {}
        self._hooks = []
        self._encoders: dict[str, nn.Module] = {}
        self._limits: dict[str, float | None] = {}
        for name, encoder, tokenizer in encoder_pairs(pipeline):
            already = [t for t in self.tokens if t in tokenizer.get_added_vocab()]
            if already:
                raise DifftuneError(f"the {name}'s tokenizer already has the token(s) {already}: choose "
                                    "another --identifier")
            rows = initial_rows(tokenizer, encoder, count, init, seed)
            self._limits[name] = None if max_norm is None else max_norm * mean_norm(encoder)
            self.ids[name] = add_tokens(tokenizer, encoder, self.tokens, rows)
            weight = encoder.get_input_embeddings().weight
            self.rows[name] = nn.Parameter(rows.to(device=weight.device, dtype=torch.float32))
            self._encoders[name] = encoder
            self._hooks.append(encoder.get_input_embeddings().register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def substitute(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            ids = torch.as_tensor(self.ids[name], device=output.device)
            match = inputs[0].unsqueeze(-1) == ids  # (..., count): which new token each position is
            found = match.any(-1, keepdim=True)
            rows = match.to(self.rows[name].dtype) @ self.effective(name)
            return torch.where(found, rows.to(output.dtype), output)
        return substitute

    def effective(self, name: str) -> torch.Tensor:
        """The rows as the encoder sees them (scaled down to the norm cap, if any)."""
        rows, limit = self.rows[name], self._limits[name]
        if limit is None:
            return rows
        return rows / (rows.norm(dim=1, keepdim=True) / limit).clamp(min=1.0)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.rows.values())

    def optimizer_parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """One group without weight decay (it would pull the rows towards zero, not their start)."""
        del weight_decay
        return [{"params": self.parameters(), "weight_decay": 0.0}]

    def describe(self) -> str:
        return (f"identifier {self.identifier!r} -> {len(self.tokens)} new tokens "
                f"({', '.join(self.tokens)}) in {', '.join(self.rows)}")

    @torch.no_grad()
    def finish(self) -> None:
        """The trained rows into the embedding matrices, hooks removed (the pipeline is then plain)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for name, encoder in self._encoders.items():
            weight = encoder.get_input_embeddings().weight
            weight[self.ids[name]] = self.effective(name).detach().to(weight)

    def file_section(self) -> TokenEmbeddings:
        """The tokens and their rows (one (count, dim) tensor per text encoder) for the adapter file."""
        tensors = {name: self.effective(name).detach().float().cpu() for name in self.rows}
        return TokenEmbeddings(self.identifier, self.tokens, tensors)
