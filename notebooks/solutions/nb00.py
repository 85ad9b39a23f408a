"""Solutions (and a plausible wrong answer each) for notebook 00's exercises."""


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


def training_bytes(model):
    # a trainable tensor: weight + gradient + Adam's m and v, all in its dtype; a frozen one: weight
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())


def training_bytes_all_16(model):
    return sum(16 * p.numel() for p in model.parameters())  # wrong: every parameter as if trained


SOLUTIONS = {1: bert_parameters, 2: llama_parameters, 3: training_bytes}
WRONG = {1: bert_parameters_no_bias, 2: llama_parameters_no_gqa, 3: training_bytes_all_16}
