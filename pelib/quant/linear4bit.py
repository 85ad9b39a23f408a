"""Linear4bit: a frozen nn.Linear stored as 4-bit NF4/FP4 codes (the base layer of QLoRA).

QLoRA (arXiv:2305.14314, eq. 5) keeps the pretrained W in 4 bits and computes in 16 (or 32):

    y = x dequant(W_4bit)^T + b

The 4-bit bytes and their scales are buffers (state_dict carries them; no optimiser sees
them). The dequantised W~ exists only inside forward and backward: the autograd.Function
saves the packed bytes and scales, never W~, and dequantises again in backward to get dx.
W~ is written into a reused workspace (one per thread, dtype and device, grown to the largest
weight seen), as Unsloth does on the GPU: on a CPU a fresh 64 MB output costs the OS ~25 ms of
page faults and zeroing, five times the dequantisation itself (`python -m pelib bench quant`).
LoRA adds its trainable path beside this layer (notebook 06); the weight gets no gradient.
Under autocast the layer acts as nn.Linear does there: W~ is dequantised straight into
autocast's dtype (2 bytes a weight written, not 4 and then a cast) and the output is in it.
"""
import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbone import drop_file_pages
from .blockwise import (
    DQ_BLOCKSIZE,
    QuantState,
    _check_blocksize,
    dequantize_4bit,
    dynamic_code,
    free_scratch,
    quantize_4bit,
    scratch,
)
from .codes import get_code


def workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch tensor of `shape` for W~, reused by every Linear4bit call on this thread.

    Safe because W~ never outlives the forward or backward that wrote it (nothing saves it).
    """
    return scratch("W~", math.prod(shape), dtype, device).view(shape)


def free_workspace() -> None:
    """Drop this thread's workspaces (they hold the largest dequantised weight seen) and the
    dequantisation's index and scale buffers."""
    free_scratch()


class Dequant4bitLinear(torch.autograd.Function):
    """y = x W~^T + b with W~ = dequantize_4bit(packed, state), in x's dtype.

    Backward, for L(y):   dL/dx = dL/dy W~          (W~ rebuilt from the saved bytes)
                          dL/db = sum_batch dL/dy    (only if the bias requires grad)
                          dL/dW: none (the 4-bit weight is frozen)
    Saved for backward: packed (n/2 bytes) and the scales, 0.52 to 0.56 bytes a weight
    instead of 2 or 4 for W~; the price is one extra dequantisation per backward.
    """

    @staticmethod
    def forward(ctx, x, packed, state: QuantState, bias, dtype=None):
        dtype = dtype or x.dtype  # W~'s dtype: x's, or autocast's (Linear4bit.forward)
        W = dequantize_4bit(packed, state, dtype=dtype,
                            out=workspace(state.shape, dtype, x.device))  # (out, in), not saved
        names = list(state.tensors())
        ctx.save_for_backward(packed, *state.tensors().values())
        ctx.state, ctx.names, ctx.has_bias, ctx.x_dtype = state, names, bias is not None, x.dtype
        return F.linear(x, W, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: (..., out)
        packed, *scales = ctx.saved_tensors
        state = replace(ctx.state, **dict(zip(ctx.names, scales)))
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = dequantize_4bit(packed, state, dtype=grad_y.dtype,
                                out=workspace(state.shape, grad_y.dtype, grad_y.device))  # again
            grad_x = (grad_y @ W).to(ctx.x_dtype)  # (..., in), in x's dtype (autocast's cast back)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out,)
        return grad_x, None, None, grad_bias, None


class Linear4bit(nn.Module):
    """A drop-in for a frozen nn.Linear whose weight is stored in 4 bits.

    Build it with Linear4bit.from_linear(linear, ...); the constructor alone allocates
    empty buffers of the right sizes, ready for load_state_dict.
    """


    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        weight_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        _check_blocksize(blocksize)  # before sizing the buffers: 64.0 would fail deep in torch.zeros
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.quant_type, self.double_quant = blocksize, quant_type, double_quant
        self.compute_dtype, self.weight_dtype = compute_dtype, weight_dtype
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("packed", torch.zeros(-(-n // 2), dtype=torch.uint8))  # (ceil(n/2),)
        self.register_buffer("code", get_code(quant_type).clone())  # (16,)
        if double_quant:
            self.register_buffer("qabsmax", torch.zeros(n_blocks, dtype=torch.uint8))
            self.register_buffer("absmax2", torch.zeros(-(-n_blocks // DQ_BLOCKSIZE)))
            self.register_buffer("code2", dynamic_code().clone())  # (256,)
            self.register_buffer("offset", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks))  # (n_blocks,) fp32
        # The base layer is frozen; set bias.requires_grad = True to train the bias.
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        quant_type: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ) -> "Linear4bit":
        W = linear.weight.detach()  # (out, in)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize,
                    quant_type, double_quant, compute_dtype, weight_dtype=W.dtype)
        packed, state = quantize_4bit(W, blocksize, quant_type, double_quant)
        layer.packed.copy_(packed)
        for name, t in state.tensors().items():
            getattr(layer, name).copy_(t)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        # A weight read in place from the checkpoint file: its fp32 pages are not needed now,
        # so they leave memory as soon as it is quantised, layer by layer (values unchanged).
        drop_file_pages(W)
        return layer.to(W.device)

    @property
    def quant_state(self) -> QuantState:
        """The QuantState of the stored weight, built from the buffers."""
        scales = ("qabsmax", "absmax2", "offset", "code2") if self.double_quant else ("absmax",)
        for name in scales + ("code",):
            t = getattr(self, name)
            if t.is_floating_point() and t.dtype != torch.float32:
                raise TypeError(f"Linear4bit.{name} must stay float32 (got {t.dtype}); "
                                "choose the compute precision with compute_dtype, not .to(dtype)")
        return QuantState(
            shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
            blocksize=self.blocksize, quant_type=self.quant_type, code=self.code,
            **{name: getattr(self, name) for name in scales},
        )

    @property
    def stored_weight_numel(self) -> int:
        """The weights held in 4 bits (buffers, so not in parameters()); see count_parameters."""
        return self.in_features * self.out_features

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W~ (out, in), in `dtype` (default: the dtype of the original weight)."""
        return dequantize_4bit(self.packed, self.quant_state, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if torch.is_autocast_enabled(x.device.type):
            # As nn.Linear under autocast: the matmul and its output in autocast's dtype. W~ is
            # dequantised straight into that dtype (the same rounding as autocast casting an fp32
            # W~, without the fp32 copy), and x and the bias are left for autocast to cast.
            dtype = torch.get_autocast_dtype(x.device.type)
            return Dequant4bitLinear.apply(x, self.packed, self.quant_state, self.bias, dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = Dequant4bitLinear.apply(x.to(self.compute_dtype), self.packed, self.quant_state, bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")
