"""New tokens in a pipeline's tokenizers and text encoders: what an adapter file's token section adds.

Pivotal tuning (`difftune.training.pivotal`) trains embeddings for an identifier's new tokens; the
adapter file keeps them (``token_embeddings.``) and `difftune.load_adapter` adds them back through
`prepare_token_loading`. The text encoders that take tokens are the family's trainable ones (the
CLIP encoders of SD 1.x/2.x and SDXL), each beside its tokenizer (``text_encoder_2`` / ``tokenizer_2``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adapter_file import TOKEN_EMBEDDINGS, TokenEmbeddings
from .errors import DifftuneError
from .families import family_of


def tokenizer_name(encoder_name: str) -> str:
    """The tokenizer beside a text encoder, as diffusers names them (text_encoder_2 → tokenizer_2)."""
    return encoder_name.replace("text_encoder", "tokenizer")


def token_names(identifier: str, count: int) -> list[str]:
    """``sks``, ``sks_1``, ...: the names diffusers' pipelines expand a multi-vector token to."""
    return [identifier] + [f"{identifier}_{i}" for i in range(1, count)]


def encoder_pairs(pipeline: Any) -> list[tuple[str, nn.Module, Any]]:
    """(name, text encoder, its tokenizer) of every text encoder of the pipeline that takes new tokens."""
    pairs = []
    for encoder_name in family_of(pipeline).trainable_text_encoders:
        encoder = getattr(pipeline, encoder_name, None)
        tokenizer = getattr(pipeline, tokenizer_name(encoder_name), None)
        if isinstance(encoder, nn.Module) and tokenizer is not None:
            pairs.append((encoder_name, encoder, tokenizer))
    if not pairs:
        raise DifftuneError("token embeddings need a pipeline with a CLIP text encoder and its tokenizer")
    return pairs


def add_tokens(tokenizer: Any, encoder: nn.Module, tokens: list[str], rows: torch.Tensor) -> list[int]:
    """Add ``tokens`` to the tokenizer (kept whole, never split) with embedding ``rows``; tokens it
    already has (a second load) keep their ids and get the new rows. Returns the ids."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    embedding = encoder.get_input_embeddings()
    if embedding.num_embeddings < len(tokenizer):
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding = encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[ids] = rows.to(embedding.weight)
    return ids


def prepare_token_loading(pipeline: Any, section: TokenEmbeddings, source: str) -> Callable[[], None]:
    """Check an adapter file's new tokens against the pipeline's tokenizers and text encoders, and
    return what adds them: `difftune.load_adapter` checks every part of a file before changing any."""
    if isinstance(pipeline, nn.Module):
        raise DifftuneError(f"{source}: the adapter carries new token embeddings; load it into a pipeline "
                            "(difftune.load_adapter(pipe, ...)), not into a bare model")
    pairs = {name: (encoder, tokenizer) for name, encoder, tokenizer in encoder_pairs(pipeline)}
    if set(section.tensors) != set(pairs):
        raise DifftuneError(f"{source}: token embeddings for {sorted(section.tensors)}, the pipeline has "
                            f"text encoders {sorted(pairs)}")
    for name, rows in section.tensors.items():
        dim = pairs[name][0].get_input_embeddings().embedding_dim
        if tuple(rows.shape) != (len(section.tokens), dim):
            raise DifftuneError(f"{source}: tensor '{TOKEN_EMBEDDINGS}.{name}' has shape {list(rows.shape)}, "
                                f"expected [{len(section.tokens)}, {dim}]")

    def add() -> None:
        for name, rows in section.tensors.items():
            encoder, tokenizer = pairs[name]
            add_tokens(tokenizer, encoder, section.tokens, rows)
    return add
