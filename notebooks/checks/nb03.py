"""Checkers for notebook 03's exercises: merging LoRA with alpha/r or rsLoRA's alpha/sqrt(r), and
DoRA's magnitude/direction weight, both against peft's own layers on the same weights."""
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn


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
            got = F.linear(x, dora_weight(W.clone(), A, B, mag.detach().clone(), layer.scaling["default"]), b)
        err = (got - ref).abs().max().item()
        assert got.shape == ref.shape and err < 1e-4 * (1 + ref.abs().max().item()), \
            f"d_in={d_in}, d_out={d_out}: max |yours - peft's DoRA| = {err:.2e} (which axis is the norm over?)"
        print(f"exercise_2: {d_out}x{d_in}, r={r}: your DoRA weight gives peft's use_dora output (max err {err:.1e})")
    print("exercise_2: correct")
