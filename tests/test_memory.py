"""The training-memory estimate (difftune.memory): each term against its closed form on a tiny FLUX.2
transformer, and docs/memory.md's tables as the command prints them."""

import re
from pathlib import Path

from conftest import build

import difftune
from difftune.families import FAMILIES
from difftune.memory import MEMORY_ROWS, estimate_memory
from difftune.memory import main as memory_main


def test_each_term_is_its_closed_form_on_a_tiny_flux2():
    transformer = build("flux2").transformer
    weights = sum(p.numel() for p in transformer.parameters())
    rows = estimate_memory(transformer, FAMILIES["flux2"], MEMORY_ROWS, "attn", resolution=1024,
                           text_tokens=512)
    estimates = {row.label: row for row in rows}
    # blocks of width 16: two joint (8 projections of 16, two gated feed-forwards 96 + 16), two single
    # (the fused 144 and 16): every block's input kept, plus the widest block's Linear outputs and attention
    tokens = (1024 // 16) ** 2 + 512
    assert estimates["LoRA r=16"].activations == 2 * tokens * (4 * 16 + (8 * 16 + 2 * (96 + 16)) + 16)
    assert estimates["LoRA r=16"].base_weights == 2 * weights
    assert estimates["LoRA r=16, 4-bit base"].base_weights == weights // 2
    difftune.add_adapter(transformer, "lora", targets="attn", rank=16)
    assert estimates["LoRA r=16"].trainable_state == 16 * difftune.count_trainable_parameters(transformer)
    difftune.remove_adapter(transformer)
    layers = difftune.add_adapter(transformer, "svfit", targets="attn", rank="full").target_names
    shapes = [transformer.get_submodule(name).weight.shape for name in layers]
    assert estimates["SVFit full rank"].adapter_buffers == sum(2 * min(s) * sum(s) for s in shapes)
    difftune.remove_adapter(transformer)
    sara = estimates["SaRA, default θ's budget (5.8%)"]
    assert sara.adapter_buffers * 4 == sara.trainable_state  # an int32 index per entry, 16 bytes of state
    assert all(row.total == row.base_weights + row.adapter_buffers + row.trainable_state + row.activations
               for row in rows)


def test_docs_memory_table_is_what_the_command_prints():
    """FLUX.2 klein 4B (the fastest to count); the other tables come from the same command."""
    printed = memory_main(["--model", "flux2-klein-4b-config"])
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
    section = docs[docs.index("### FLUX.2 klein 4B"):]
    assert [line for line in section.splitlines() if line.startswith("| ")][:len(rows)] == rows
    assert re.search(r"python -m difftune\.memory --model flux2-klein-4b-config", docs)
