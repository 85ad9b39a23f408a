"""Checkers for notebook 00's exercises: parameter and memory ledgers, by formula, against real
(tiny, randomly initialised) transformers models."""
import copy

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from checks._guard import forbidden

BERT_CONFIGS = [  # (vocab, hidden, layers, intermediate, max_positions, type_vocab)
    (100, 16, 2, 64, 32, 2), (257, 24, 3, 40, 20, 1), (30522, 384, 6, 1536, 512, 2),
]
LLAMA_CONFIGS = [  # (vocab, hidden, layers, intermediate, n_heads, n_kv_heads, tied)
    (100, 32, 2, 48, 4, 4, False), (120, 36, 3, 50, 9, 3, True), (90, 48, 2, 64, 6, 2, False),
]


def _count(model):
    return sum(p.numel() for p in model.parameters())  # tied tensors once


def exercise_1(bert_parameters):
    """bert_parameters(vocab, hidden, layers, intermediate, max_positions, type_vocab) -> int,
    the parameters of transformers' BertModel (with its pooler)."""
    for vocab, h, L, i, pos, types in BERT_CONFIGS:
        if h > 100:  # MiniLM's shape: known count, no need to build 22.7M random numbers
            real = 22_713_216
        else:
            cfg = BertConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=L,
                             num_attention_heads=4, intermediate_size=i,
                             max_position_embeddings=pos, type_vocab_size=types)
            real = _count(BertModel(cfg))
        got = bert_parameters(vocab, h, L, i, pos, types)
        assert got == real, f"BERT {vocab, h, L, i, pos, types}: you say {got:,}, the model has {real:,}"
        print(f"exercise_1: BERT vocab={vocab} hidden={h} layers={L}: {real:,} parameters, as counted")
    print("exercise_1: correct")


def exercise_2(llama_parameters):
    """llama_parameters(vocab, hidden, layers, intermediate, n_heads, n_kv_heads, tied) -> int,
    the parameters of transformers' LlamaForCausalLM (grouped-query attention, optional tied head)."""
    for vocab, h, L, i, nh, nkv, tied in LLAMA_CONFIGS:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=L, intermediate_size=i,
                          num_attention_heads=nh, num_key_value_heads=nkv,
                          tie_word_embeddings=tied)
        real = _count(LlamaForCausalLM(cfg))
        got = llama_parameters(vocab, h, L, i, nh, nkv, tied)
        assert got == real, (f"Llama {vocab, h, L, i, nh, nkv, tied}: you say {got:,}, the model has "
                             f"{real:,}")
        print(f"exercise_2: Llama hidden={h}, {nh} query / {nkv} KV heads, tied={tied}: {real:,}")
    got = llama_parameters(49152, 576, 30, 1536, 9, 3, True)
    assert got == 134_515_008, f"SmolLM2-135M: you say {got:,}, it has 134,515,008"
    print("exercise_2: SmolLM2-135M: 134,515,008. correct")


OPTIMIZERS = {  # the name an answer receives -> the real optimizer the checker steps
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}
# while the answer runs, no optimizer can step: the bytes must come from the update rules
_STEPS = [(torch.optim.SGD, "step"), (torch.optim.AdamW, "step"), (torch.optim.Adam, "step"),
          (torch.optim.Adafactor, "step")]


def _measured_bytes(model, optimizer, x):
    """Bytes of every parameter, gradient and optimizer state tensor after a real step (on a
    copy, so the model the answer sees has no gradients)."""
    model = copy.deepcopy(model)
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
    model(x).float().sum().backward()
    opt.step()
    tensors = list(model.parameters())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    return sum(t.numel() * t.element_size() for t in tensors)


def _models():
    torch.manual_seed(0)
    x = torch.randn(3, 20)
    m = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    yield "all trainable, fp32", m, x
    m = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
    m[0].to(torch.bfloat16).requires_grad_(False)
    yield "first layer frozen in bf16", torch.nn.Sequential(_To(torch.bfloat16), m[0],
                                                              _To(torch.float32), *m[1:]), x
    yield "an embedding table and a head", _Bag(50, 12, 7), torch.randint(0, 50, (3, 6))


def exercise_3(training_bytes):
    """training_bytes(model, optimizer) -> int: weights + gradients + the optimizer's state after
    one step, in bytes, each tensor in its own dtype, for optimizer in OPTIMIZERS; frozen
    parameters (requires_grad False) cost only their weight."""
    for label, model, x in _models():
        for name in OPTIMIZERS:
            with forbidden(*_STEPS):
                got = training_bytes(model, name)
            expected = _measured_bytes(model, name, x)
            assert got == expected, (f"{label}, {name}: you say {got:,} bytes, a real {name} step "
                                     f"holds {expected:,}")
            print(f"exercise_3: {label:<30} {name:<9} {expected:>7,} bytes, as measured")
    print("exercise_3: correct")


class _Bag(torch.nn.Module):
    """ids (B, T) -> the mean of their embeddings (B, d) -> logits (B, k)."""

    def __init__(self, vocab, d, k):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, k)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


class _To(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)
