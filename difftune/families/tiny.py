"""Parts of the tiny built-in models: offline tokenizers and small text encoders and VAEs.

Tests and the offline demo need pipelines that exist without a download. Each family builds
its tiny pipeline (``builtin:tiny-<family>``) from these parts and a small denoiser config of
its own: deterministic random weights and byte-level tokenizers that need no vocabulary file.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

TINY_SAMPLE_SIZE = 32  # latent size of every tiny denoiser
TINY_VAE_SCALE_FACTOR = 2  # the tiny VAE has two blocks: it halves the size
TINY_VAE_WIDTH = 32  # channels of its first block
TINY_RESOLUTION = TINY_SAMPLE_SIZE * TINY_VAE_SCALE_FACTOR


def offline_clip_tokenizer(words: tuple[str, ...] = (), model_max_length: int = 77):
    """A real byte-level BPE CLIP tokenizer built without any download.

    Every byte maps to its own token (plus an end-of-word form), so any text
    tokenizes; each word in ``words`` additionally becomes one whole token, which
    gives small text encoders a useful vocabulary.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    merges: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        chars = _byte_level_text(word)
        _merge_into_one_token([*chars[:-1], chars[-1] + "</w>"], vocab, merges)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def _byte_level_text(text: str) -> list[str]:
    """``text`` as byte-level BPE characters, one per UTF-8 byte."""
    byte_to_char = dict(zip(range(256), _byte_level_chars(), strict=True))
    return [byte_to_char[b] for b in text.encode("utf-8")]


def _merge_into_one_token(pieces: list[str], vocab: dict[str, int],
                          merges: dict[tuple[str, str], int]) -> None:
    """Add the merges (and tokens) that make BPE turn ``pieces`` into one token.

    Merges of earlier words can interrupt this word's chain, so merge what BPE leaves of it
    until one token remains. New merges rank after all older ones, which leaves the
    tokenization of earlier words unchanged.
    """
    pieces = _apply_bpe(pieces, merges)
    while len(pieces) > 1:
        merges.setdefault((pieces[0], pieces[1]), len(merges))
        vocab.setdefault(pieces[0] + pieces[1], len(vocab))
        pieces = _apply_bpe(pieces, merges)


def _byte_level_chars() -> list[str]:
    """The printable character GPT-2/CLIP byte-level BPE uses for each byte value 0..255."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _apply_bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        pieces[index:index + 2] = [pieces[index] + pieces[index + 1]]
    return pieces


def offline_chat_tokenizer(special_tokens: tuple[str, ...], chat_template: str, words: str = "",
                           model_max_length: int = 2048, **roles: str):
    """A byte-level BPE tokenizer of the Qwen/Mistral kind (GPT-2 byte alphabet, Qwen's
    pre-tokenizer) with a chat template, built without any download.

    Every byte is a token, so any text tokenizes; each word of ``words`` (the system prompts a
    pipeline wraps around every prompt) also becomes one token, with and without its leading
    space, so a wrapped prompt costs about as many tokens as with the real vocabulary.
    ``special_tokens`` are added whole; ``roles`` names the bos/eos/pad/unk tokens among them.
    The tokenizer round-trips through ``save_pretrained``/``from_pretrained``.
    """
    import re

    from transformers import Qwen2Tokenizer

    vocab = {char: index for index, char in enumerate(_byte_level_chars())}
    merges: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(re.findall(r"[A-Za-z]+", words)):
        for text in (word, " " + word):
            _merge_into_one_token(_byte_level_text(text), vocab, merges)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges),
                               model_max_length=model_max_length,
                               **{"unk_token": None, "bos_token": None, **roles})
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special_tokens
                                                                if t not in roles.values()]})
    tokenizer.chat_template = chat_template
    return tokenizer


# Qwen's chat format, written for the tiny tokenizers: turns between <|im_start|> and <|im_end|>; a
# generation prompt opens the assistant's turn, with an empty reasoning block when thinking is off.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>")


def offline_qwen_tokenizer(words: str = ""):
    """A Qwen2Tokenizer with Qwen's special tokens and chat format, built offline."""
    return offline_chat_tokenizer(QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, words=words,
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")


def qwen_text_config(tokenizer, layers: int, width: int) -> dict[str, Any]:
    """A small Qwen2/Qwen3 language-model config that fits ``tokenizer``: one narrow attention head,
    since the prompts of these pipelines are padded to hundreds of tokens."""
    return {"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": layers, "num_attention_heads": 1, "num_key_value_heads": 1,
            "head_dim": 8, "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def tiny_qwen3(layers: int, width: int = 16, causal_lm: bool = False):
    """A Qwen tokenizer and a ``layers``-deep Qwen3 text model (``Qwen3ForCausalLM`` with
    ``causal_lm``, else the bare ``Qwen3Model``), ``width`` wide."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    tokenizer = offline_qwen_tokenizer()
    config = Qwen3Config(**qwen_text_config(tokenizer, layers, width))
    return tokenizer, (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def offline_t5_tokenizer(model_max_length: int = 512):
    """A T5 (unigram, SentencePiece-style) tokenizer built without any download.

    Every printable ASCII character is a piece, alone and word-initial (``▁a``), so any
    English text tokenizes into distinct ids; other characters map to ``<unk>``.
    """
    from transformers import T5TokenizerFast

    pieces = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + p, -3.0) for p in pieces] + [(p, -4.0) for p in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def clip_text_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32):
    """A 5-layer CLIP text-encoder config that fits ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def tiny_t5_encoder(tokenizer) -> nn.Module:
    """A 2-layer, 32-wide T5 encoder that fits ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def tiny_vae(latent_channels: int = 4, widths: tuple[int, ...] = (TINY_VAE_WIDTH, 64),
             norm_num_groups: int = 32, **extra: Any):
    """A small AutoencoderKL, one block per width: the default two halve the size (64-px images, 32-px
    latents); ``extra``: its scaling and shift factors, ..."""
    from diffusers import AutoencoderKL

    scale = 2 ** (len(widths) - 1)
    return AutoencoderKL(
        block_out_channels=widths,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=TINY_SAMPLE_SIZE * scale,
        **extra,
    )


def build_model(class_name: str, config: dict[str, Any]) -> nn.Module:
    """A diffusers model of ``class_name`` from ``config``, with random weights."""
    import diffusers

    return getattr(diffusers, class_name)(**config)


def seeded(seed: int) -> None:
    """Seed torch before a tiny pipeline is built: the same seed gives the same weights."""
    torch.manual_seed(seed)
