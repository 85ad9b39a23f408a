"""cast_frozen: the frozen base stored in bf16 for bf16 training; what trains stays fp32."""
import torch

import pelib
from pelib.backbone import cast_frozen
from pelib.quant import apply_qlora


def test_frozen_weights_in_bf16_trainable_in_fp32():
    model = pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0]
    apply_qlora(model, ["query", "value"], r=4)
    cast_frozen(model, torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    q = model.bert.encoder.layer[0].attention.self.query.base_layer
    assert q.packed.dtype == torch.uint8 and q.absmax2.dtype == q.code.dtype == torch.float32
    ids = torch.randint(5, 1000, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=torch.tensor([0, 3])).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)


def test_a_bf16_base_computes_what_autocast_computed_from_fp32():
    """Under autocast nn.Linear casts an fp32 weight to bf16 on every forward: storing it in bf16
    once gives the same output and the same LoRA gradients."""
    torch.manual_seed(0)
    layers = [pelib.apply_lora(torch.nn.Sequential(torch.nn.Linear(48, 40)), ["0"], r=4) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    with torch.no_grad():
        layers[0][0].lora_B.weight.normal_()
        layers[1][0].lora_B.weight.copy_(layers[0][0].lora_B.weight)
    cast_frozen(layers[1], torch.bfloat16)
    assert layers[1][0].base_layer.weight.dtype == torch.bfloat16
    x = torch.randn(5, 48)
    outs = []
    for layer in layers:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        outs.append((y, layer[0].lora_A.weight.grad, layer[0].lora_B.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
