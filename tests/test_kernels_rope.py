"""RoPE on Q and K (GQA): Triton vs transformers' apply_rotary_pos_emb, forward and backward."""
import pytest
import torch
from conftest import TOL, assert_close
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from pelib.kernels.rope import apply_rope_ref, apply_rope_triton

pytestmark = pytest.mark.integration  # Triton kernels in the interpreter

GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _qkcs(B, Hq, Hk, T, D, dtype, pos_batch):
    gen = torch.Generator().manual_seed(0)
    # HF's layout: the projection output (B, T, H*D) viewed and transposed to (B, H, T, D)
    q = torch.randn(B, T, Hq * D, generator=gen).to(dtype).view(B, T, Hq, D).transpose(1, 2)
    k = torch.randn(B, T, Hk * D, generator=gen).to(dtype).view(B, T, Hk, D).transpose(1, 2)
    cfg = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk,
                      max_position_embeddings=256)
    rot = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(3, 3 + T).expand(pos_batch, T)
    cos, sin = rot(q, pos)                                                    # (pos_batch, T, D)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pos_batch", [1, 2])
def test_rope_gqa_vs_hf(dtype, pos_batch):
    q, k, cos, sin = _qkcs(2, 9, 3, 37, 64, dtype, pos_batch)                 # SmolLM2's heads
    qh, kh = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo_hf, ko_hf = apply_rotary_pos_emb(qh.float(), kh.float(), cos.float(), sin.float())
    dqo, dko = torch.randn_like(qo_hf).to(dtype), torch.randn_like(ko_hf).to(dtype)
    (qo_hf * dqo.float()).sum().add((ko_hf * dko.float()).sum()).backward()

    qt, kt = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = apply_rope_triton(qt, kt, cos, sin)
    torch.autograd.backward((qo, ko), (dqo, dko))
    assert_close(qo, qo_hf.detach().to(dtype), *TOL[dtype], "q_embed")
    assert_close(ko, ko_hf.detach().to(dtype), *TOL[dtype], "k_embed")
    assert_close(qt.grad, qh.grad.to(dtype), *GRAD_TOL[dtype], "dq")
    assert_close(kt.grad, kh.grad.to(dtype), *GRAD_TOL[dtype], "dk")
    # the in-file reference is HF's function, bit for bit, in the input dtype
    for a, b in zip(apply_rope_ref(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_rope_bthd_layout_and_odd_half():
    # unsqueeze_dim=2: (B, T, H, D); and D=2*20 (half not a power of two, masked)
    gen = torch.Generator().manual_seed(1)
    B, T, H, D = 1, 19, 2, 40
    q, k = torch.randn(B, T, H, D, generator=gen), torch.randn(B, T, 1, D, generator=gen)
    ang = torch.randn(B, T, D // 2, generator=gen)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    for a, b in zip(apply_rope_triton(q, k, cos, sin, 2), apply_rotary_pos_emb(q, k, cos, sin, 2)):
        assert_close(a.contiguous(), b, *TOL[torch.float32], "bthd")
