"""Checkers for notebook 03's exercises: merging LoRA with alpha/r or rsLoRA's alpha/sqrt(r),
DoRA's magnitude/direction weight and PiSSA's principal-part initialisation, each against peft's
own layers on the same weights (peft's DoRA and PiSSA code is disabled while the answer runs)."""
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from checks._guard import forbidden
from pelib.dora import DoRALinear


class _Tiny(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def _peft_layer(d_in, d_out, r, alpha, **kw):
    """A peft LoRA layer around a random nn.Linear, with random (not zero) B."""
    model = get_peft_model(_Tiny(d_in, d_out), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"],
                                                          lora_dropout=0.0, **kw))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer.eval()


def exercise_1(merged_weight):
    """merged_weight(W, A, B, alpha, r, rslora) -> W + s B A, s = alpha/r or alpha/sqrt(r)."""
    torch.manual_seed(0)
    for rslora in (False, True):
        for d_in, d_out, r, alpha in [(24, 40, 4, 8), (33, 17, 16, 8)]:
            layer = _peft_layer(d_in, d_out, r, alpha, use_rslora=rslora)
            W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
            A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
            x = torch.randn(5, d_in)
            with torch.no_grad():
                ref = layer(x)
                got = F.linear(x, merged_weight(W.clone(), A, B, alpha, r, rslora), b)
            err = (got - ref).abs().max().item()
            assert err < 1e-4 * (1 + ref.abs().max().item()), \
                f"rslora={rslora}, r={r}, alpha={alpha}: max |merged - peft| = {err:.2e}"
            print(f"exercise_1: rslora={rslora}, r={r}, alpha={alpha}: scaling {layer.scaling['default']:.3f}, "
                  f"merged weight gives peft's output (max err {err:.1e})")
    print("exercise_1: correct")


def exercise_2(dora_weight):
    """dora_weight(W, A, B, magnitude, scaling) -> magnitude * V / ||V|| with V = W + scaling B A,
    the norm taken per output row (DoRA's column norm in the paper's W^T layout)."""
    torch.manual_seed(0)
    for d_in, d_out, r, alpha in [(24, 40, 4, 8), (48, 20, 8, 16)]:
        layer = _peft_layer(d_in, d_out, r, alpha, use_dora=True)
        with torch.no_grad():
            mag = layer.lora_magnitude_vector["default"].weight
            mag.mul_(torch.rand_like(mag) + 0.5)                     # the magnitude trained away
        W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        x = torch.randn(5, d_in)
        with torch.no_grad():
            ref = layer(x)
            with forbidden((DoraLinearLayer, "forward"), (DoraLinearLayer, "get_weight_norm"),
                           (DoRALinear, "forward"), (DoRALinear, "weight_norm"), (DoRALinear, "merge")):
                W_dora = dora_weight(W.clone(), A, B, mag.detach().clone(), layer.scaling["default"])
            got = F.linear(x, W_dora, b)
        err = (got - ref).abs().max().item()
        assert got.shape == ref.shape and err < 1e-4 * (1 + ref.abs().max().item()), \
            f"d_in={d_in}, d_out={d_out}: max |yours - peft's DoRA| = {err:.2e} (which axis is the norm over?)"
        print(f"exercise_2: {d_out}x{d_in}, r={r}: your DoRA weight gives peft's use_dora output (max err {err:.1e})")
    print("exercise_2: correct")


def exercise_3(pissa_init):
    """pissa_init(W, r, scaling) -> (A, B, W_res): the top-r singular part of W as the adapter,
    scaling * B @ A, split evenly between A and B; the rest W_res stays frozen."""
    torch.manual_seed(0)
    for d_in, d_out, r, alpha in [(24, 40, 4, 8), (48, 20, 8, 8), (30, 30, 2, 16)]:
        lin = _Tiny(d_in, d_out)
        W = lin.lin.weight.detach().clone()                          # (d_out, d_in)
        model = get_peft_model(lin, LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"],
                                               lora_dropout=0.0, init_lora_weights="pissa"))
        layer = model.base_model.model.lin.eval()
        s = layer.scaling["default"]
        with forbidden((LoraLayer, "pissa_init")):
            A, B, W_res = pissa_init(W.clone(), r, s)
        assert tuple(A.shape) == (r, d_in) and tuple(B.shape) == (d_out, r), \
            f"A should be (r, d_in) = {(r, d_in)} and B (d_out, r) = {(d_out, r)}"
        pA, pB = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        err_res = (W_res - layer.base_layer.weight.detach()).abs().max().item()
        assert err_res < 1e-4, f"{d_out}x{d_in}, r={r}: W_res differs from peft's by {err_res:.2e}"
        err = (s * B @ A - s * pB @ pA).abs().max().item()
        assert err < 1e-4, (f"{d_out}x{d_in}, r={r}, scaling {s}: scaling * B A differs from the "
                            f"top-{r} singular part of W by {err:.2e} (did you divide by the scaling?)")
        AAt, BtB = A @ A.T, B.T @ B                                  # (r, r) each
        off = (AAt - torch.diag(torch.diagonal(AAt))).abs().max().item()
        assert off < 1e-4, "the rows of A should be orthogonal (sqrt(S_r) times right singular vectors)"
        assert torch.allclose(torch.diagonal(AAt), torch.diagonal(BtB), rtol=1e-3, atol=1e-5), \
            "A and B should share sqrt(S_r / scaling) evenly: |a_k| = |b_k| for every k"
        x = torch.randn(5, d_in)
        with torch.no_grad():
            got = F.linear(x, W_res, lin.lin.bias) + s * F.linear(F.linear(x, A), B)
            ref = layer(x)
        assert (got - ref).abs().max() < 1e-4, "the adapted layer does not compute peft's PiSSA layer"
        print(f"exercise_3: {d_out}x{d_in}, r={r}, scaling {s}: A, B and W_res equal peft's PiSSA init "
              f"(|W_res| / |W| = {(W_res.norm() / W.norm()).item():.3f})")
    print("exercise_3: correct")
