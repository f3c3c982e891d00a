"""Pivotal tuning (--train_token_embedding): the identifier's new tokens, their training, the file."""

import pytest
import torch
from conftest import build, generate, randomize_adapter
from safetensors.torch import save_file

import difftune
from difftune.adapter_file import AdapterFile, read_safetensors
from difftune.errors import AdapterFileError, DifftuneError
from difftune.export import export_adapter
from difftune.families import FAMILIES
from difftune.tokens import tokenizer_name
from difftune.training.pivotal import TokenEmbeddingTraining

PROMPT = "a photo of a sks dog"


def encode(pipe, prompt: str = PROMPT) -> torch.Tensor:
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def test_identifier_becomes_the_new_tokens():
    pipe = build("sd")
    old_vocab = len(pipe.tokenizer)
    tokens = TokenEmbeddingTraining(pipe, "sks", 3, "random", seed=0)
    assert tokens.tokens == ["sks", "sks_1", "sks_2"]
    assert tokens.ids["text_encoder"] == [old_vocab, old_vocab + 1, old_vocab + 2]
    # the pipeline expands the identifier (diffusers' multi-vector convention), the tokenizer keeps it whole
    converted = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)
    assert converted == "a photo of a sks sks_1 sks_2 dog"
    ids = pipe.tokenizer(converted).input_ids
    new = [i for i in ids if i >= old_vocab]
    assert new == tokens.ids["text_encoder"]
    first = ids.index(new[0])
    assert ids[first:first + 3] == new  # together, in order, where the identifier was
    # random start at the vocabulary's mean norm
    weight = pipe.text_encoder.get_input_embeddings().weight[:old_vocab]
    norms = tokens.rows["text_encoder"].norm(dim=1)
    assert torch.allclose(norms, weight.norm(dim=1).mean().expand(3), rtol=1e-5)


def test_a_word_initialises_every_new_token():
    pipe = build("sd")
    tokens = TokenEmbeddingTraining(pipe, "sks", 2, "dog", seed=0)
    dog = pipe.tokenizer("dog", add_special_tokens=False).input_ids
    expected = pipe.text_encoder.get_input_embeddings().weight[dog].mean(0)
    assert torch.allclose(tokens.rows["text_encoder"], expected.expand(2, -1))


def test_training_changes_only_the_new_rows():
    pipe = build("sd")
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    tokens = TokenEmbeddingTraining(pipe, "sks", 2, "random", seed=0)
    start = tokens.rows["text_encoder"].detach().clone()
    pipe.text_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(tokens.optimizer_parameter_groups(0.1), lr=1e-2)
    target = torch.randn_like(encode(pipe))
    losses = []
    for _ in range(5):
        loss = (encode(pipe) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trained = tokens.rows["text_encoder"].detach().clone()
    assert (trained - start).abs().max() > 1e-3
    with_hook = encode(pipe)
    tokens.finish()
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    old = before.shape[0]
    assert torch.equal(after[:old], before)  # every existing token as it was
    assert torch.equal(after[old:], trained)  # the new rows are the trained ones
    # the matrix alone (hooks gone) encodes as the hook did
    assert torch.allclose(encode(pipe), with_hook, atol=1e-6)
    # a prompt without the identifier is untouched by all of it
    assert torch.equal(encode(pipe, "a photo of a dog"), encode(build("sd"), "a photo of a dog"))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_trained_tokens_round_trip_through_the_adapter_file(family, tmp_path):
    pipe = build(family)
    difftune.add_adapter(pipe.unet, "lora", targets="attn", rank=4)
    randomize_adapter(pipe.unet)
    tokens = TokenEmbeddingTraining(pipe, "sks", 2, "random", seed=0)
    with torch.no_grad():
        for rows in tokens.parameters():
            rows.add_(torch.randn_like(rows))
    tokens.finish()
    images = generate(pipe, prompt=PROMPT)
    path = difftune.save_adapter(pipe, tmp_path / "a.safetensors", token_embeddings=tokens.file_section())
    info = difftune.read_adapter_info(path)
    encoders = {"sd": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}}[family]
    assert info["token_embeddings"] == {"identifier": "sks", "tokens": ["sks", "sks_1"]}

    fresh = build(family)
    difftune.load_adapter(fresh, path)
    assert set(tokens.rows) == encoders
    for name in FAMILIES[family].trainable_text_encoders:
        if name in encoders:
            tokenizer = getattr(fresh, tokenizer_name(name))
            assert tokenizer.convert_tokens_to_ids(["sks", "sks_1"]) == tokens.ids[name]
    assert abs(generate(fresh, prompt=PROMPT) - images).max() == 0
    # the tokens carry the difference: the same LoRA without them draws something else
    lora_only = build(family)
    difftune.add_adapter(lora_only.unet, "lora", targets="attn", rank=4)
    randomize_adapter(lora_only.unet)
    assert abs(generate(lora_only, prompt=PROMPT) - images).max() > 1e-3
    # a bare denoiser cannot take the tokens; nothing stays attached after the refusal
    bare = build(family).unet
    with pytest.raises(DifftuneError, match="new token embeddings"):
        difftune.load_adapter(bare, path)
    assert not difftune.has_adapter(bare)
    with pytest.raises(DifftuneError, match="cannot be combined"):
        difftune.load_adapter(build(family), [path, path])
    for fmt in ("kohya", "diffusers"):  # their files have no place for the tokens
        with pytest.raises(DifftuneError, match="new token embeddings"):
            export_adapter(path, tmp_path / f"out-{fmt}", fmt, pipeline=build(family))


def test_trainer_saves_the_tokens_and_refuses_what_cannot_carry_them(train_subject, subject_dir, tmp_path):
    common = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", subject_dir,
              "--instance_prompt", "a photo of sks disc", "--adapter", "lora", "--max_train_steps", 3,
              "--seed", 3, "--report_to", "none", "--skip_final_inference"]
    path = train_subject(*common, "--output_dir", tmp_path / "run", "--train_token_embedding",
                         "--token_embedding_lr", 1e-2, "--checkpointing_steps", 2)
    info = difftune.read_adapter_info(path)
    assert info["token_embeddings"]["tokens"] == ["sks", "sks_1"]
    assert not (path.parent / "pytorch_lora_weights.safetensors").exists()  # no diffusers LoRA copy
    pipe = build("sd")
    start = TokenEmbeddingTraining(build("sd"), "sks", 2, "random", seed=3).rows["text_encoder"]
    difftune.load_adapter(pipe, path)
    loaded = pipe.text_encoder.get_input_embeddings().weight[-2:]
    assert (loaded - start).abs().max() > 1e-4  # trained away from the seeded start
    for extra, message in [(["--num_new_tokens", 3], "without --train_token_embedding"),
                           (["--train_token_embedding", "--identifier", "xyz"], "does not occur"),
                           (["--train_token_embedding", "--export", "kohya"], "cannot carry"),
                           (["--train_token_embedding", "--num_new_tokens", 0], "at least 1"),
                           (["--train_token_embedding", "--pre_compute_text_embeddings"],
                            "change every step"),
                           (["--init_adapter", path], "carries new token embeddings"),
                           (["--train_token_embedding", "--pretrained_model_name_or_path",
                             "builtin:tiny-sd3"], "--train_token_embedding supports SD 1.x/2.x and SDXL")]:
        with pytest.raises(DifftuneError, match=message):
            train_subject(*common, "--output_dir", tmp_path / "bad", *extra)
    # its checkpoint holds no tokens: resuming it (with or without the flag) is refused
    for extra, message in [([], "cannot be resumed"), (["--train_token_embedding"], "cannot be combined")]:
        with pytest.raises(DifftuneError, match=message):
            train_subject(*common, "--output_dir", tmp_path / "run", "--resume_from_checkpoint", "latest",
                          *extra)


def test_the_token_section_is_checked_and_covered_by_the_checksum(tmp_path):
    pipe = build("sd")
    difftune.add_adapter(pipe.unet, "lora", targets="attn", rank=4)
    tokens = TokenEmbeddingTraining(pipe, "sks", 2, "random", seed=0)
    tokens.finish()
    path = difftune.save_adapter(pipe, tmp_path / "a.safetensors", token_embeddings=tokens.file_section())
    tensors, metadata = read_safetensors(path)
    tensors["token_embeddings.text_encoder"][0, 0] += 1.0  # a changed embedding, header as it was
    save_file(tensors, tmp_path / "edited.safetensors", metadata)
    with pytest.raises(AdapterFileError, match="checksum"):
        difftune.load_adapter(build("sd"), tmp_path / "edited.safetensors")
    file = AdapterFile.read(path)
    file.token_embeddings.tokens = []
    file.write(tmp_path / "empty.safetensors")
    with pytest.raises(AdapterFileError, match="'token_embeddings.tokens' must be a non-empty list"):
        difftune.read_adapter_info(tmp_path / "empty.safetensors")
    file.token_embeddings.tokens = ["sks", "sks_1", "sks_2"]  # three names, two rows
    file.write(tmp_path / "short.safetensors")
    fresh = build("sd")
    with pytest.raises(DifftuneError, match=r"shape \[2, 32\], expected \[3, 32\]"):
        difftune.load_adapter(fresh, tmp_path / "short.safetensors")
    assert not difftune.has_adapter(fresh) and "sks" not in fresh.tokenizer.get_added_vocab()


def test_norm_cap_scales_long_rows_down_to_it():
    pipe = build("sd")
    typical = pipe.text_encoder.get_input_embeddings().weight.norm(dim=1).mean()
    tokens = TokenEmbeddingTraining(pipe, "sks", 2, "random", seed=0, max_norm=2.0)
    with torch.no_grad():
        rows = tokens.rows["text_encoder"]
        rows[0] *= 10.0  # beyond the cap: used at 2 mean norms, same direction
        rows[1] *= 1.5  # within it: used as it is
    direction = rows[0] / rows[0].norm()
    within = rows[1].detach().clone()
    tokens.finish()
    written = pipe.text_encoder.get_input_embeddings().weight[tokens.ids["text_encoder"]]
    assert torch.allclose(written[0], direction * 2.0 * typical, atol=1e-6)
    assert torch.allclose(written[1], within)
