"""DoRA: init, the paper's formula, merge/unmerge, errors, and parity with peft's
LoraConfig(use_dora=True) on the same weights (layers of the real MiniLM and SmolLM2, whole tiny
models), both ways through peft's adapter files; its registry entry (recipe, builders,
pelib.load_adapter)."""
import copy

import pytest
import torch
from conftest import HEADS, batch, tiny
from safetensors.torch import load_file
from torch import nn

import pelib
from pelib import peers
from pelib.dora import (
    DoRAConfig,
    DoRALinear,
    apply_dora,
    dora_layers,
    dora_state_dict,
    load_dora,
    load_dora_state,
    save_dora,
)
from pelib.lora import LoRAConfig, LoRALinear, lora_layers, merge, unmerge
from pelib.methods import METHODS, Run

TARGETS = {"minilm": ["query", "value", "dense"], "smollm2": ["q_proj", "k_proj", "gate_proj"]}
# Both libraries run the same fp32 operations on the same tensors, except that peft forms B A
# for the norm as (I A^T) B^T, a product summed in another order than B @ A. That moves
# ||W + s B A||_c, hence m / ||.||_c, by a few float32 ulps (eps 1.2e-7); an output of size ~1
# may then move by some 1e-7. 1e-5 + 1e-5 |ref| is that with a hundredfold margin, and a wrong
# formula (an undetached norm, dropout on the base, a scaled bias) misses it by orders.
ATOL = RTOL = 1e-5


def close(ours, ref, what):
    """Assert |ours - ref| <= ATOL + RTOL |ref|; return the max abs difference (reported)."""
    err = (ours.double() - ref.double()).abs()
    bound = ATOL + RTOL * ref.double().abs()
    assert ours.shape == ref.shape and (err <= bound).all(), (what, err.max().item())
    return err.max().item()


def peft_name(name):
    """pelib's parameter name -> the name in peft's model (adapter `default`, head copy)."""
    for k in ("lora_A", "lora_B"):
        name = name.replace(f".{k}.", f".{k}.default.")
    name = name.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
    for head in HEADS:
        if name.startswith(head):
            name = head + "modules_to_save.default." + name.removeprefix(head)
    return "base_model.model." + name


def move_off_init(model, seed=1):
    """B = 0 and m = ||W||_c at step 0 hide most of DoRA; random B and m make every term count."""
    g = torch.Generator().manual_seed(seed)
    for _, m in dora_layers(model):
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1
        v = m.lora_magnitude_vector
        v.data = v.data * (1 + 0.2 * torch.randn(v.shape, generator=g))


def copy_into_peft(ours, theirs):
    params = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            params[peft_name(n)].data.copy_(p.data)


def peft_dora(model, targets, r=4, alpha=8, dropout=0.0, task=True):
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(model, LoraConfig(
        task_type=TaskType.SEQ_CLS if task else None, r=r, lora_alpha=alpha,
        lora_dropout=dropout, target_modules=targets, use_dora=True))


# ---- the layer against the paper's formula --------------------------------------------------

def test_init_is_the_base_and_m_is_the_row_norm():
    base = nn.Linear(20, 12)
    layer = DoRALinear(base, r=4, alpha=8)
    assert torch.allclose(layer.lora_magnitude_vector, base.weight.norm(dim=1))  # (12,)
    assert layer.lora_magnitude_vector.requires_grad
    x = torch.randn(3, 7, 20)
    assert torch.equal(layer(x), base(x))  # B = 0 and m = ||W||_c: W' = W exactly


def test_forward_is_the_papers_formula_with_a_detached_norm():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(20, 12), r=4, alpha=8)
    layer.lora_B.weight.data.normal_(0, 0.1)
    layer.lora_magnitude_vector.data.mul_(1.5)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, m, s = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, 2.0
    x = torch.randn(5, 20)

    def eq5(detach):  # y = x W'^T + b, W' = m V / ||V||_c, V = W + s B A: (out, in)
        V = W + s * B @ A
        norm = V.norm(dim=1, keepdim=True)                               # (out, 1)
        return x @ (m[:, None] * V / (norm.detach() if detach else norm)).T + b

    y = layer(x)
    assert torch.allclose(y, eq5(True), atol=1e-5, rtol=1e-5)
    # the norm is a constant in backprop: d y / d B matches the reference with the detach,
    # and differs from one whose norm carries a gradient
    gB = torch.autograd.grad(y.sum(), B)[0]
    assert torch.allclose(gB, torch.autograd.grad(eq5(True).sum(), B)[0], atol=1e-5)
    assert not torch.allclose(gB, torch.autograd.grad(eq5(False).sum(), B)[0], atol=1e-4)


def test_merge_unmerge_restore():
    model = apply_dora(tiny(), TARGETS["minilm"], r=4, alpha=8).eval()
    move_off_init(model)
    x = batch()
    W0 = {n: m.base_layer.weight.clone() for n, m in dora_layers(model)}
    with torch.no_grad():
        y = model(**x).logits
        merge(model)  # pelib.lora.merge reaches DoRA layers too (they are LoRA layers)
        assert all(m.merged for _, m in dora_layers(model))
        y_merged = model(**x).logits
        unmerge(model)
        y_back = model(**x).logits
    close(y_merged, y, "merged logits")
    close(y_back, y, "unmerged logits")
    for n, m in dora_layers(model):
        close(m.base_layer.weight, W0[n], n)


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="positive integer"):
        apply_dora(tiny(), ["query"], r=0)
    with pytest.raises(ValueError, match="positive integer"):
        apply_dora(tiny(), ["query"], r=-2)
    with pytest.raises(ValueError, match="choose r <= 32"):
        apply_dora(tiny(), ["query"], r=33)
    with pytest.raises(ValueError, match="match no module.*query"):
        apply_dora(tiny(), ["qkv"])
    with pytest.raises(TypeError, match="DoRA here targets nn.Linear"):
        apply_dora(tiny(), ["word_embeddings"], r=4)
    with pytest.raises(ValueError, match="dropout must be in"):
        apply_dora(tiny(), ["query"], r=4, dropout=1.0)
    with pytest.raises(ValueError, match="already has DoRA"):
        apply_dora(apply_dora(tiny(), ["query"], r=4), ["query"], r=4)
    with pytest.raises(ValueError, match="no DoRA layers.*apply_dora"):
        dora_state_dict(pelib.apply_lora(tiny(), ["query"], r=4))


# ---- parity with peft -----------------------------------------------------------------------

class Holder(nn.Module):
    """One linear layer as a model, so peft can wrap it by name."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.fixture(scope="module")
def real_layers():
    """One pretrained projection of each backbone: MiniLM's query (384 -> 384, with a bias) and
    SmolLM2's gate_proj (576 -> 1536, no bias)."""
    minilm = pelib.load_backbone("minilm", num_labels=2)[0]
    smollm2 = pelib.load_backbone("smollm2", num_labels=2)[0]
    return {"minilm": copy.deepcopy(minilm.bert.encoder.layer[0].attention.self.query),
            "smollm2": copy.deepcopy(smollm2.model.layers[0].mlp.gate_proj)}


@pytest.mark.slow  # real pretrained weights
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_layer_parity_with_peft(real_layers, name):
    """Same W, A, B (B != 0) and m (moved off its init): output, grads of A, B, m and the merged
    weight equal peft's."""
    layer = real_layers[name]
    ours = Holder(DoRALinear(copy.deepcopy(layer), r=8, alpha=16))
    ours.proj.base_layer.requires_grad_(False)  # frozen W, as in peft
    move_off_init(ours)
    theirs = peft_dora(Holder(copy.deepcopy(layer)), ["proj"], r=8, alpha=16, task=False)
    copy_into_peft(ours, theirs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, layer.in_features, generator=g)        # (B, T, in)
    w = torch.randn(3, 11, layer.out_features, generator=g)       # a loss that weighs every output
    y_a, y_b = ours(x), theirs(x)
    diffs = {"forward": close(y_a, y_b, "forward")}
    (y_a * w).sum().backward()
    (y_b * w).sum().backward()
    theirs_params = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            diffs[f"grad {n.split('.')[1]}"] = close(p.grad, theirs_params[peft_name(n)].grad, n)
    with torch.no_grad():
        ours.proj.merge()
        merged = theirs.merge_and_unload().proj.weight
    diffs["merged W"] = close(ours.proj.base_layer.weight, merged, "merged weight")
    print(f"\n{name} {layer.out_features}x{layer.in_features}: max |ours - peft| "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_parity_with_peft(name, dropout):
    """A whole (tiny) classifier in train mode, dropout included: logits and every gradient
    (A, B, m, head) equal peft's; with the same random stream both drop the same inputs."""
    ours = apply_dora(tiny(name=name), TARGETS[name], r=4, alpha=8, dropout=dropout)
    move_off_init(ours)
    theirs = peft_dora(tiny(name=name), TARGETS[name], dropout=dropout)
    copy_into_peft(ours, theirs)
    ours.train(), theirs.train()
    x, labels = batch(ours.config.vocab_size), torch.tensor([0, 3, 1])
    torch.manual_seed(5)
    out_a = ours(**x, labels=labels)
    torch.manual_seed(5)
    out_b = theirs(**x, labels=labels)
    close(out_a.logits, out_b.logits, "logits")
    out_a.loss.backward()
    out_b.loss.backward()
    params = dict(theirs.named_parameters())
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert any(n.endswith("lora_magnitude_vector") for n in names)
    for n in names:
        close(dict(ours.named_parameters())[n].grad, params[peft_name(n)].grad, n)


# ---- peft's adapter files, both ways ---------------------------------------------------------

@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_peft_file_loads_into_pelib(tmp_path, name):
    from peft import get_peft_model_state_dict

    theirs = peft_dora(tiny(name=name), TARGETS[name]).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():  # off init, so a wrong load would show
            if "lora_B" in n or "lora_magnitude_vector" in n:
                p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    x = batch(theirs.config.vocab_size)
    with torch.no_grad():
        ref = theirs(**x).logits
        ours = load_dora(tiny(name=name), tmp_path).eval()  # the folder: config + tensors
        close(ours(**x).logits, ref, "logits, file")
        # the tensors alone, into a model built by hand
        fresh = apply_dora(tiny(name=name), TARGETS[name], r=4, alpha=8).eval()
        load_dora_state(fresh, load_file(tmp_path / "adapter_model.safetensors"))
        close(fresh(**x).logits, ref, "logits, tensors")
    # our state dict is peft's, key for key and tensor for tensor
    mine, peft_sd = dora_state_dict(ours), get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(peft_sd)
    assert all(torch.equal(mine[k], peft_sd[k]) for k in mine)


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_pelib_file_loads_into_peft(tmp_path, name):
    import json

    from peft import PeftModel, set_peft_model_state_dict

    ours = apply_dora(tiny(name=name), TARGETS[name], r=4, alpha=8).eval()
    move_off_init(ours)
    save_dora(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    x = batch(ours.config.vocab_size)
    with torch.no_grad():
        ref = ours(**x).logits
        theirs = PeftModel.from_pretrained(tiny(name=name), tmp_path).eval()
        close(theirs(**x).logits, ref, "logits, file")
        by_hand = peft_dora(tiny(name=name), TARGETS[name]).eval()
        result = set_peft_model_state_dict(by_hand, dora_state_dict(ours))
        assert not result.unexpected_keys
        close(by_hand(**x).logits, ref, "logits, tensors")


def test_files_that_do_not_fit_are_refused(tmp_path):
    pelib.save_adapter(pelib.apply_lora(tiny(), ["query"], r=4), tmp_path / "lora")
    with pytest.raises(ValueError, match="no `use_dora: true`"):
        load_dora(tiny(), tmp_path / "lora")
    ours = apply_dora(tiny(), ["query"], r=4)
    save_dora(ours, tmp_path / "dora")
    with pytest.raises(ValueError, match="other settings.*'r': \\(2, 4\\)"):
        load_dora(apply_dora(tiny(), ["query"], r=2), tmp_path / "dora")
    tensors = dora_state_dict(ours)
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    with pytest.raises(ValueError, match="missing from the file"):
        load_dora_state(apply_dora(tiny(), ["query"], r=4), {k: v for k, v in tensors.items()
                                                             if k != key})
    merged = merge(apply_dora(tiny(), ["query"], r=4))
    with pytest.raises(ValueError, match="merged"):
        load_dora_state(merged, tensors)


# ---- the registry entry ----------------------------------------------------------------------

def test_the_recipe_is_loras_and_its_file_says_use_dora():
    from peft import LoraConfig

    c = DoRAConfig()
    assert METHODS["dora"].config is DoRAConfig and pelib.DoRAConfig is DoRAConfig
    assert (c.r, c.alpha, c.dropout, c.rslora, c.lr) == (8, 16, 0.0, False, LoRAConfig.lr)
    assert "use_dora" in DoRAConfig.MATCH and DoRAConfig.FLAGS == ("use_dora",)
    c = DoRAConfig(r=4, dropout=0.1, targets=["query", "value"])
    file = dict(c.to_peft(), target_modules=["query", "value"])
    assert (file["peft_type"], file["use_dora"], file["lora_alpha"]) == ("LORA", True, 8)
    assert DoRAConfig.from_peft(file) == c
    with pytest.raises(ValueError, match="no `use_dora: true`"):
        DoRAConfig.from_peft(dict(file, use_dora=False))
    peer = LoraConfig(**{k: v for k, v in c.to_peft().items() if k != "peft_type"})
    assert peer.use_dora and (peer.r, peer.lora_alpha, peer.lora_dropout) == (4, 8, 0.1)


def test_the_registry_builds_the_same_dora_in_pelib_and_in_peft():
    """`finetune --method dora` and `--impl peft`: the two builders give the same model."""
    config, run = DoRAConfig(r=4), Run(TARGETS["minilm"], 10)
    ours, _ = METHODS["dora"].build["pelib"](tiny(), config, run)
    theirs, _ = METHODS["dora"].build["peft"](tiny(), config, run)
    assert theirs.peft_config["default"].use_dora
    assert {type(m) for _, m in lora_layers(ours)} == {DoRALinear}
    move_off_init(ours)
    copy_into_peft(ours, theirs)
    x = batch()
    with torch.no_grad():
        close(ours.eval()(**x).logits, theirs.eval()(**x).logits, "logits")


def test_load_adapter_reads_a_dora_file_as_dora(tmp_path):
    targets = TARGETS["minilm"]
    ours = apply_dora(tiny(), targets, r=4).eval()
    move_off_init(ours)
    pelib.save_adapter(ours, tmp_path / "dora")
    x = batch()
    with torch.no_grad():
        ref = ours(**x).logits
        back = pelib.load_adapter(tiny(), tmp_path / "dora").eval()  # a fresh base model
        assert {type(m) for _, m in lora_layers(back)} == {DoRALinear}
        assert torch.equal(back(**x).logits, ref)
        again = pelib.load_adapter(apply_dora(tiny(), targets, r=4), tmp_path / "dora").eval()
        assert torch.equal(again(**x).logits, ref)  # into a model holding the same layers
    # peft's own LoRA file says `use_dora: false`: still LoRA, also into LoRA layers
    peers.lora(tiny(), targets, 4, 8).save_pretrained(tmp_path / "lora")
    assert {type(m) for _, m in lora_layers(pelib.load_adapter(tiny(), tmp_path / "lora"))} \
        == {LoRALinear}
    pelib.load_adapter(pelib.apply_lora(tiny(), targets, r=4), tmp_path / "lora")
    # each refuses the other's file, and says whose it is
    with pytest.raises(ValueError, match="holds a DoRA .*use_dora: true.*not a lora one"):
        pelib.load_adapter(tiny(), tmp_path / "dora", method="lora")
    with pytest.raises(ValueError, match="holds a LoRA .*no use_dora.*not a dora one"):
        pelib.load_adapter(tiny(), tmp_path / "lora", method="dora")
    with pytest.raises(ValueError, match="other settings.*'use_dora': \\(False, True\\)"):
        pelib.load_adapter(pelib.apply_lora(tiny(), targets, r=4), tmp_path / "dora")
    with pytest.raises(ValueError, match="other settings.*'use_dora': \\(True, False\\)"):
        pelib.load_adapter(apply_dora(tiny(), targets, r=4), tmp_path / "lora")


# ---- training --------------------------------------------------------------------------------

@pytest.mark.integration  # trains a few dozen steps
def test_a_few_steps_train_m_and_lower_the_loss():
    torch.manual_seed(0)
    model = apply_dora(tiny(), TARGETS["minilm"], r=4, alpha=8).train()
    m0 = {n: m.lora_magnitude_vector.detach().clone() for n, m in dora_layers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, labels = batch(), torch.tensor([0, 3, 1])
    losses = []
    for _ in range(8):
        loss = model(**x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, m in dora_layers(model):
        assert not torch.equal(m.lora_magnitude_vector, m0[n]), n  # m is trained, not frozen
