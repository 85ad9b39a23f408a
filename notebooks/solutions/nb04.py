"""Solutions (and a plausible wrong answer each) for notebook 04's exercises."""
import torch
from scipy.stats import norm


def absmax_quantise(W, code, blocksize):
    blocks = W.reshape(-1, blocksize)                              # (n_blocks, B)
    absmax = blocks.abs().amax(dim=1, keepdim=True)                # (n_blocks, 1)
    x = blocks / absmax                                            # in [-1, 1]
    q = (x[..., None] - code).abs().argmin(-1)                     # nearest level: (n_blocks, B)
    return (code[q] * absmax).reshape(W.shape)


def absmax_quantise_global(W, code, blocksize):
    absmax = W.abs().max()                                         # wrong: one scale for all of W
    q = ((W / absmax)[..., None] - code).abs().argmin(-1)
    return code[q] * absmax


def nf4_from_equation(k, offset):
    p = torch.linspace(1 - offset, offset, 2**k + 1, dtype=torch.float64).numpy()
    Q = torch.tensor(norm.ppf(p))                                  # 2^k + 1 quantiles
    q = (Q[:-1] + Q[1:]) / 2                                       # 2^k levels
    return (q / q.abs().max()).sort().values


def nf4_from_equation_no_mean(k, offset):
    p = torch.linspace(1 - offset, offset, 2**k + 1, dtype=torch.float64).numpy()
    Q = torch.tensor(norm.ppf(p))[:-1]                             # wrong: quantiles, not their means
    return (Q / Q.abs().max()).sort().values


def nf_offset(k):
    a, b = 2**k - 1, 2**k                                          # the two bin counts averaged
    return ((1 - 1 / (2 * a)) + (1 - 1 / (2 * b))) / 2


def nf_offset_one_bin(k):
    return 1 - 1 / (2 * 2**k)                                      # wrong: only m = 2^k


def nf_code(k, offset):
    n = 2 ** (k - 1)                                               # positive levels; n - 1 negative
    p_pos = torch.linspace(offset, 0.5, n + 1)[:-1].numpy()        # float32, 0.5 dropped
    p_neg = torch.linspace(offset, 0.5, n)[:-1].numpy()
    v = torch.tensor([*norm.ppf(p_pos), 0.0, *(-norm.ppf(p_neg))], dtype=torch.float32).sort().values
    return v / v.max()                                             # (2^k,)


SOLUTIONS = {1: absmax_quantise, 2: nf4_from_equation, 3: (nf_offset, nf_code)}
WRONG = {1: absmax_quantise_global, 2: nf4_from_equation_no_mean, 3: (nf_offset_one_bin, nf_code)}
