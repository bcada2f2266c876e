"""CUDA checks (marker ``cuda``; skipped without a GPU; scripts/gpu_check.sh runs them on a GPU machine):
flash-attention 2 against sdpa, HASI's decompositions on the GPU against fp64, bf16 ZeRO-3 training."""
import importlib.util
import math

import pytest
import torch
from run_fixtures import launch, make_run, read_metrics
from tiny_models import llama_config

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
FLASH = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not FLASH, reason="flash-attn not installed (pip install -e .[gpu])")
def test_flash_attention_2_matches_sdpa_bf16():
    from transformers import LlamaForCausalLM

    config = llama_config(vocab=256, layers=2)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = 128, 256, 4   # head dim 32
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, 48), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0                                   # right padding goes through flash-attn's varlen path
    out = {}
    for impl in ("sdpa", "flash_attention_2"):
        torch.manual_seed(1)
        config._attn_implementation = impl
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out[impl] = (res.logits.float()[mask.bool()], float(res.loss))
    (la, loss_a), (lb, loss_b) = out["sdpa"], out["flash_attention_2"]
    assert (la - lb).abs().max() <= 0.05 * la.abs().max()
    assert loss_a == pytest.approx(loss_b, rel=1e-2)


def test_hasi_routes_on_cuda_match_fp64():
    from thanora_ds.hasi import normalized_spectral_entropy, task_spectrum

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1024, 768, generator=g) / 768 ** 0.5).cuda()
    x = torch.randn(1536, 768, generator=g) * torch.exp(-3 * torch.arange(768) / 768)
    cov = (x.T @ x / 1536).cuda()
    ref = task_spectrum(w, cov, keep=24, decomposition="svd64")
    for route in ("gram32", "gram64", "svd32"):
        got = task_spectrum(w, cov, keep=24, decomposition=route)
        assert got.sigma.is_cuda and got.vh.is_cuda
        assert abs(normalized_spectral_entropy(got.sigma) - normalized_spectral_entropy(ref.sigma)) <= 1e-4
        assert (got.vh * ref.vh).sum(1).abs().min() >= 1 - 1e-3


def test_bf16_zero3_thanora_training_on_cuda(tmp_path):
    config = make_run(tmp_path, model__dtype="bf16")
    launch(config, 1, "train.max_steps=3")
    metrics = read_metrics(tmp_path / "out")
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert (tmp_path / "out" / "final" / "adapter_weights.safetensors").is_file()
