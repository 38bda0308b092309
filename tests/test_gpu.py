"""The GPU paths the CPU suite cannot run: half precision and the 8-bit optimizer on CUDA.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with `pytest -m gpu -s`. The
quickstart is trained on the GPU in bf16 with bitsandbytes' AdamW8bit and in fp16 with AdamW and
loss scaling, and each LoRA is scored by the same protocol and thresholds as the CPU quickstart in
tests/test_quickstart_learns.py (scored on the CPU in fp32, so the numbers compare with the CPU's).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import REPO, run_quickstart

sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUICKSTART_MODEL = "builtin:shapes-sdxl"
GPU_RUNS = {"bf16-adamw8bit": ("bf16", "adamw8bit"), "fp16-adamw": ("fp16", "adamw")}


@pytest.fixture(scope="module", autouse=True)
def all_cpu_threads():
    """conftest keeps CPU tests to 2 threads; the GPU machine's CPU scores samples faster with all of its cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)


def test_a_half_precision_step_stays_close_to_fp32():
    import precision_check

    setup = precision_check.shapes_setup(torch.device("cuda"), batch_size=16)
    results = {result.precision: result for result in precision_check.compare_precisions(setup)}
    for result in results.values():
        print(result)
    assert all(result.finite for result in results.values())
    # Adapters and loss are fp32 in both; only the frozen weights and the autocast products are half.
    assert results["bf16"].gradient_cosine >= 0.999 and results["bf16"].gradient_error <= 0.05
    assert results["bf16"].loss_error <= 0.01
    assert results["fp16"].gradient_cosine >= 0.9999 and results["fp16"].gradient_error <= 0.02
    assert results["fp16"].loss_error <= 0.005


@pytest.fixture(scope="module")
def evaluation():
    import evaluate_shapes

    return evaluate_shapes


@pytest.fixture(scope="module")
def base_scores(evaluation):
    base = evaluation.load_pipeline(QUICKSTART_MODEL)
    return evaluation.trigger_cyan_shares(base), evaluation.old_prompt_scores(base)


@pytest.fixture(scope="module", params=list(GPU_RUNS))
def gpu_quickstart(request, tmp_path_factory):
    precision, optimizer = GPU_RUNS[request.param]
    out = tmp_path_factory.mktemp(request.param) / "quickstart"
    result = run_quickstart(out, f"training.mixed_precision={precision}", f"training.optimizer={optimizer}")
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, out / "quickstart.safetensors"


def test_the_gpu_quickstart_records_its_precision_and_optimizer(gpu_quickstart):
    from safetensors import safe_open

    name, path = gpu_quickstart
    with safe_open(str(path), "pt") as lora:
        metadata = lora.metadata()
    precision, optimizer = GPU_RUNS[name]
    assert metadata["ss_mixed_precision"] == precision
    assert metadata["ss_optimizer"].startswith({"adamw8bit": "bitsandbytes.optim.AdamW8bit(", "adamw": "torch.optim.AdamW("}[optimizer])


def test_the_gpu_quickstart_learns_the_concept_and_keeps_the_old_ones(gpu_quickstart, base_scores, evaluation):
    name, path = gpu_quickstart
    tuned = evaluation.load_pipeline(QUICKSTART_MODEL, [(path, 1.0)])
    with_lora = evaluation.trigger_cyan_shares(tuned)
    after = evaluation.old_prompt_scores(tuned)
    without_lora, before = base_scores
    mean_before, mean_after = sum(before.values()) / len(before), sum(after.values()) / len(after)
    print(f"{name}: cyan with the LoRA {with_lora}, without {without_lora}; old prompts {mean_before:.1%} -> {mean_after:.1%}")
    assert sum(with_lora) / len(with_lora) >= 0.80
    assert sum(without_lora) / len(without_lora) <= 0.20
    assert mean_after >= mean_before - 0.10
