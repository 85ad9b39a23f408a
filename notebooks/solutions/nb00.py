"""Solutions (and a plausible wrong answer each) for notebook 00's exercises."""
import math


def bert_parameters(vocab, hidden, layers, intermediate, max_positions, type_vocab):
    h, i = hidden, intermediate
    embeddings = (vocab + max_positions + type_vocab) * h + 2 * h          # + LayerNorm
    attention = 4 * (h * h + h) + 2 * h                                    # Q K V O + LayerNorm
    ffn = (h * i + i) + (i * h + h) + 2 * h                                # W_1, W_2 + LayerNorm
    pooler = h * h + h
    return embeddings + layers * (attention + ffn) + pooler


def bert_parameters_no_bias(vocab, hidden, layers, intermediate, max_positions, type_vocab):
    h, i = hidden, intermediate  # wrong: the weight matrices only (no biases, no LayerNorms)
    return (vocab + max_positions + type_vocab) * h + layers * (4 * h * h + 2 * h * i) + h * h


def llama_parameters(vocab, hidden, layers, intermediate, n_heads, n_kv_heads, tied):
    h, d_h = hidden, hidden // n_heads
    attention = 2 * h * h + 2 * h * n_kv_heads * d_h                       # q, o: (h, h); k, v: (h, n_kv d_h)
    mlp = 3 * h * intermediate                                             # gate, up, down; no biases
    norms = 2 * h                                                          # two RMSNorms a layer
    return vocab * h + layers * (attention + mlp + norms) + h + (0 if tied else vocab * h)


def llama_parameters_no_gqa(vocab, hidden, layers, intermediate, n_heads, n_kv_heads, tied):
    h = hidden  # wrong: K and V as wide as Q (ignores grouped-query attention)
    return vocab * h + layers * (4 * h * h + 3 * h * intermediate + 2 * h) + h + (0 if tied else vocab * h)


def _state_numel(p, optimizer):
    """Elements the optimizer remembers for parameter p between steps."""
    if optimizer == "sgd":
        return 0
    if optimizer == "momentum":
        return p.numel()                                  # the buffer b
    if optimizer == "adamw":
        return 2 * p.numel()                              # m and v
    if p.dim() >= 2:                                      # adafactor: R (rows) and C (columns)
        *lead, n, m = p.shape
        return math.prod(lead) * (n + m)
    return p.numel()                                      # adafactor on a vector: the full v


def training_bytes(model, optimizer):
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()             # the weight
        if p.requires_grad:                               # its gradient and the optimizer state
            total += (p.numel() + _state_numel(p, optimizer)) * p.element_size()
    return total


def training_bytes_adafactor_full(model, optimizer):
    # wrong: Adafactor as Adam without m, a full v for every matrix (no factoring)
    return training_bytes(model, "momentum" if optimizer == "adafactor" else optimizer)


SOLUTIONS = {1: bert_parameters, 2: llama_parameters, 3: training_bytes}
WRONG = {1: bert_parameters_no_bias, 2: llama_parameters_no_gqa, 3: training_bytes_adafactor_full}
