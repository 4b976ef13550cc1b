"""Optional precision modes, and CUDA where there is one."""

from __future__ import annotations

import pytest
import torch
from conftest import VGGLike, randomize_batch_norms

import lrp_core


def _model_and_input():
    torch.manual_seed(0)
    model = randomize_batch_norms(VGGLike(), torch.Generator().manual_seed(0)).eval()
    return model, torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])


def test_bf16_mode_is_close_to_fp32_and_returns_the_input_dtype():
    model, x, target = _model_and_input()
    reference = lrp_core.attribute(model, x, target, precision="fp32")
    fast = lrp_core.attribute(model, x, target, precision="bf16")
    assert fast.dtype == torch.float32 and fast.shape == x.shape
    cosine = torch.nn.functional.cosine_similarity(fast.flatten(1), reference.flatten(1)).min().item()
    assert cosine > 0.95
    assert not torch.equal(fast, reference), "bf16 mode must actually compute in bf16"


def test_tf32_mode_restores_global_flags():
    model, x, target = _model_and_input()
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    lrp_core.attribute(model, x, target, precision="tf32")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model, x, target = _model_and_input()
    model = model.double()
    cpu = lrp_core.attribute(model, x.double(), target)
    gpu = lrp_core.attribute(model.cuda(), x.double().cuda(), target.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-9)
