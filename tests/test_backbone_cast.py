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
        norm = "LayerNorm" in name  # a few numbers per layer, kept fp32 (see the DoRA test)
        assert p.dtype == (torch.float32 if p.requires_grad or norm else torch.bfloat16), name
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


def test_buffers_keep_their_dtype():
    """Weights are parameters: RoPE's frequencies stay fp32, as in a checkpoint loaded in bf16
    (transformers computes them in fp32 there too), so no rotation angle moves."""
    from transformers import AutoModelForCausalLM

    model = pelib.tiny_backbone("smollm2", 5, with_tokenizer=False)[0]
    pelib.apply_lora(model, ["q_proj", "v_proj"], r=4)
    cast_frozen(model, torch.bfloat16)
    loaded = AutoModelForCausalLM.from_config(model.config, dtype=torch.bfloat16)
    for name, b in loaded.named_buffers():  # the reference: what a bf16 load keeps
        assert dict(model.named_buffers())[name].dtype == b.dtype == torch.float32, name
    assert model.model.embed_tokens.weight.dtype == loaded.model.embed_tokens.weight.dtype


def test_an_adapter_that_adds_in_fp32_trains_on_a_bf16_base():
    """DoRA's magnitude is fp32, so its output and the residual stream after it are fp32 under
    autocast; CPU layer_norm refuses an fp32 input with bf16 parameters, which is why the norms
    stay fp32 (with bf16 norms this step raised 'mixed dtype (CPU)')."""
    model = pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0]
    pelib.apply_dora(model, ["query", "value", "dense"], r=4)
    cast_frozen(model, torch.bfloat16)
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert model.bert.embeddings.LayerNorm.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=torch.randint(5, 1000, (2, 9)), labels=torch.tensor([0, 3])).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
