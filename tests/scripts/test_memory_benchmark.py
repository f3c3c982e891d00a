"""The SaRA memory benchmark's modes, on the tiny UNet (the real run is SD 1.5 size)."""

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmarks/memory_sara.py")


def test_weight_gradient_floor_computes_and_drops_every_weight_gradient(benchmark):
    from difftune.families.sd import SDFamily

    unet = SDFamily.build_tiny().unet
    benchmark.drop_weight_gradients(unet)
    weights = [p for p in unet.parameters() if p.requires_grad]
    kernels = [m.weight for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert {id(w) for w in weights} == {id(k) for k in kernels}
    seen = []
    for weight in weights:  # runs after the floor's own hook: the gradient is already gone
        weight.register_post_accumulate_grad_hook(lambda param: seen.append(param.grad is None))
    sample = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 4, unet.config.cross_attention_dim)
    unet(sample, torch.tensor([10]), text).sample.square().mean().backward()
    assert len(seen) == len(weights) and all(seen)


@pytest.mark.parametrize("mode", ["lora-r4", "weight-grads", "sara", "sara-dense-grads", "supertuning",
                                  "shira", "lora-budget"])
def test_each_mode_runs_a_timed_step(benchmark, mode):
    threads = torch.get_num_threads()
    budget = 2e4 if mode in benchmark.BUDGET_MODES else None
    result = benchmark.run_child({"mode": mode, "budget": budget, "layers": "linear", "batch": 1,
                                  "resolution": 64, "device": "cpu", "steps": 1, "threads": threads,
                                  "unet": "tiny"})
    assert result["seconds"] > 0 and result["peak_gib"] > 0
    assert (result["trainable"] == 0) == (mode == "weight-grads")
    if budget:  # the peers train about the budget, on the Linear layers only
        assert 0.8 * budget <= result["trainable"] <= 1.3 * budget
    if mode == "sara":  # every trained layer reports its measured route
        assert result["routes"] and {route["path"] for route in result["routes"]} <= {"sampled", "dense"}
    if mode == "sara-dense-grads":
        assert result["routes"] == []


def test_the_plan_interleaves_layer_sets_and_needs_a_local_official_copy(benchmark, tmp_path):
    args = benchmark.parse_args(["--docs", ""])
    modes = {(s["mode"], s["layers"]) for s in benchmark.plan(args)}
    assert ("official-sara", "linear") not in modes  # never downloaded: only with --official_sara
    assert ("supertuning", "linear") in modes and ("supertuning", "all") not in modes
    assert ("sara", "all") in modes and ("weight-grads", "linear") in modes
    args = benchmark.parse_args(["--docs", "", "--official_sara", str(tmp_path)])
    assert any(s["mode"] == "official-sara" for s in benchmark.plan(args))
    with pytest.raises(SystemExit, match="no optim/adamw.py"):
        benchmark.run_child({"mode": "official-sara", "budget": 2e4, "layers": "linear", "batch": 1,
                             "resolution": 64, "device": "cpu", "steps": 1, "threads": 1, "unet": "tiny",
                             "official_sara": str(tmp_path)})


def test_docs_mode_replaces_its_section_and_puts_the_chart_under_images(benchmark, tmp_path):
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text(f"# Benchmarks\n\n{benchmark.SECTION}\n\nold text\n\n## Next section\n\nkept\n")
    benchmark.main(["--unet", "tiny", "--modes", "lora-r4", "weight-grads", "--layers", "linear",
                    "--resolution", "64", "--steps", "1", "--docs", str(docs)])
    page = docs.read_text()
    chart = tmp_path / "docs" / "images" / "benchmark_sara_memory_cpu.png"
    assert chart.is_file() and "![chart](images/benchmark_sara_memory_cpu.png)" in page
    assert "old text" not in page and page.endswith("## Next section\n\nkept\n")
    assert benchmark.SUBSECTIONS["cpu"] in page and "lora" in page.split(benchmark.SUBSECTIONS["cpu"])[1]
