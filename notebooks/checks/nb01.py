"""Checkers for notebook 01's exercises: adapter parameter counts (against pelib's adapters on a
tiny BERT, counted tensor by tensor), a parallel adapter (against its formula), a cosine
learning-rate schedule (against transformers' own), a label-smoothed cross-entropy (against
torch's own) and Compacter's Kronecker-factored weight (against a block-by-block assembly). The
library references are disabled while the answer runs."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from checks._guard import forbidden
from pelib.adapter import apply_adapters


def _tiny_bert(d, n_layers, n_labels):
    cfg = BertConfig(vocab_size=50, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=2,
                     intermediate_size=2 * d, max_position_embeddings=16, num_labels=n_labels)
    return BertForSequenceClassification(cfg)


def exercise_1(houlsby_trainable):
    """houlsby_trainable(n_layers, d, m, n_labels, train_layernorms) -> int: the trainable
    parameters of a BERT with Houlsby adapters and a new head, with or without every LayerNorm."""
    torch.manual_seed(0)
    for n_layers, d, m, n_labels in [(2, 16, 4, 3), (3, 24, 8, 5)]:
        for train_ln in (False, True):
            model = apply_adapters(_tiny_bert(d, n_layers, n_labels), "houlsby", m)
            if train_ln:
                for mod in model.modules():
                    if isinstance(mod, nn.LayerNorm):
                        mod.requires_grad_(True)
            real = sum(p.numel() for p in model.parameters() if p.requires_grad)
            got = houlsby_trainable(n_layers, d, m, n_labels, train_ln)
            assert got == real, (f"{n_layers} layers, d={d}, m={m}, {n_labels} labels, LayerNorms "
                                 f"trained={train_ln}: you say {got:,}, the model trains {real:,}")
            print(f"exercise_1: {n_layers} layers, d={d}, m={m}, LayerNorms trained={train_ln}: {real:,}")
    print("exercise_1: correct")


def exercise_2(ParallelAdapter):
    """ParallelAdapter(linear, m, scale): y = linear(x) + scale * up(relu(down(x))), reading the
    linear's *input*; `down`, `up` are nn.Linear; the linear frozen; identity at init."""
    torch.manual_seed(0)
    d_in, d_out, m, scale = 24, 40, 8, 4.0
    lin = nn.Linear(d_in, d_out)
    pa = ParallelAdapter(lin, m, scale=scale)
    assert tuple(pa.down.weight.shape) == (m, d_in), \
        f"down should map the linear's input d_in={d_in} to m={m}: weight {tuple(pa.down.weight.shape)}"
    assert tuple(pa.up.weight.shape) == (d_out, m), \
        f"up should map m={m} to the linear's output d_out={d_out}: weight {tuple(pa.up.weight.shape)}"
    assert not any(p.requires_grad for p in lin.parameters()), "the wrapped linear must be frozen"
    n = sum(p.numel() for p in pa.parameters() if p.requires_grad)
    assert n == d_in * m + m + m * d_out + d_out, f"{n} trainable; expected down and up with biases"
    x = torch.randn(3, 5, d_in)                                    # (B, T, d_in)
    assert torch.equal(pa(x), lin(x)), "at init the wrapper must compute exactly the linear"
    pa(x).square().sum().backward()
    assert pa.up.weight.grad is not None and pa.up.weight.grad.abs().max() > 0, \
        "at init W_up should get a gradient (is W_down zero too, or the ReLU dead?)"
    print("exercise_2: shapes, frozen base, identity at init, first gradient into W_up: ok")
    with torch.no_grad():
        for p in (*pa.down.parameters(), *pa.up.parameters()):
            p.normal_()
        ref = lin(x) + scale * F.linear(F.relu(F.linear(x, pa.down.weight, pa.down.bias)),
                                        pa.up.weight, pa.up.bias)
        err = (pa(x) - ref).abs().max().item()
    assert err < 1e-4, f"after training-like weights, max |yours - formula| = {err:.2e}"
    print(f"exercise_2: equals linear(x) + {scale} * up(relu(down(x))) (max err {err:.1e}). correct")


def exercise_3(cosine_factor):
    """cosine_factor(s, S, w) -> float: the lr factor of step s of S, the notebook's linear
    warm-up over w steps, then half a cosine from 1 down to 0 over the remaining S - w steps."""
    import transformers
    import transformers.optimization

    import pelib.schedule
    import pelib.train

    references = [(transformers, "get_cosine_schedule_with_warmup"),
                  (transformers.optimization, "get_cosine_schedule_with_warmup"),
                  (pelib.schedule, "lr_schedule"), (pelib.train, "lr_schedule")]
    for S, w in [(50, 5), (846, 51), (12, 0)]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = transformers.get_cosine_schedule_with_warmup(opt, w, S)
        for s in range(S):
            want = (s + 1) / w if s < w else opt.param_groups[0]["lr"]  # ours learns at step 0
            with forbidden(*references):
                got = cosine_factor(s, S, w)
            assert abs(got - want) < 1e-9, (f"S={S}, w={w}, step {s}: you say {got:.6f}, expected "
                                            f"{want:.6f} (half a cosine over the S - w steps after "
                                            "the warm-up)")
            opt.step()
            sched.step()
        print(f"exercise_3: S={S}, w={w}: all {S} factors equal transformers' cosine schedule "
              "after the warm-up")
    print("exercise_3: correct")


def exercise_4(smoothed_cross_entropy):
    """smoothed_cross_entropy(logits, labels, eps) -> scalar: the mean over rows of the
    cross-entropy against a target with 1 - eps on the label and eps / K on each of K classes."""
    torch.manual_seed(0)
    for B, K in [(8, 77), (5, 3)]:
        logits, labels = 3 * torch.randn(B, K), torch.randint(0, K, (B,))   # (B, K), (B,)
        for eps in (0.0, 0.1, 0.5):
            want = F.cross_entropy(logits, labels, label_smoothing=eps)
            with forbidden((F, "cross_entropy")):
                got = smoothed_cross_entropy(logits, labels, eps)
            assert torch.is_tensor(got) and got.shape == (), f"return a scalar tensor, not {got!r}"
            assert abs(got.item() - want.item()) < 1e-5, (
                f"B={B}, K={K}, eps={eps}: you say {got.item():.6f}, torch says {want.item():.6f}"
                + (" (eps / K goes to every class, the label's own included)" if eps else ""))
    logits = torch.randn(4, 5, requires_grad=True)
    with forbidden((F, "cross_entropy")):
        loss = smoothed_cross_entropy(logits, torch.arange(4), 0.1)
    loss.backward()
    target = 0.9 * F.one_hot(torch.arange(4), 5) + 0.1 / 5
    grad = (logits.softmax(-1) - target) / 4                        # d loss / d logits
    assert torch.allclose(logits.grad, grad, atol=1e-6), "the gradient is not softmax - target"
    print("exercise_4: equals torch's label_smoothing at eps 0, 0.1, 0.5; gradient softmax - "
          "target. correct")


def _phm_blocks(A, s, t):
    """The reference: W assembled block by block, block (a, b) = sum_i A[i, a, b] s_i t_i^T."""
    n, p, q = A.shape[0], s.shape[1], t.shape[1]
    W = torch.zeros(n * p, n * q, dtype=A.dtype)
    for a in range(n):
        for b in range(n):
            for i in range(n):
                W[a * p:(a + 1) * p, b * q:(b + 1) * q] += A[i, a, b] * torch.outer(s[i], t[i])
    return W


def exercise_5(phm_weight):
    """phm_weight(A, s, t) -> W (k, d) = sum_i A_i kron (s_i t_i^T), A (n, n, n), s (n, k/n),
    t (n, d/n); differentiable in A, s and t."""
    torch.manual_seed(0)
    for n, k, d in [(2, 6, 4), (4, 8, 12), (3, 9, 3)]:
        A = torch.randn(n, n, n, dtype=torch.float64, requires_grad=True)
        s = torch.randn(n, k // n, dtype=torch.float64, requires_grad=True)
        t = torch.randn(n, d // n, dtype=torch.float64, requires_grad=True)
        W = phm_weight(A, s, t)
        assert torch.is_tensor(W) and tuple(W.shape) == (k, d), \
            f"n={n}: W should be (k, d) = {(k, d)}, got {tuple(getattr(W, 'shape', ()))}"
        want = _phm_blocks(A.detach(), s.detach(), t.detach())
        err = (W.detach() - want).abs().max().item()
        assert err < 1e-10, (f"n={n}, k={k}, d={d}: max |yours - block assembly| = {err:.2e} "
                             "(block (a, b) of W is sum_i A_i[a, b] * s_i t_i^T)")
        G = torch.randn(k, d, dtype=torch.float64)                  # an upstream gradient
        grads = torch.autograd.grad((W * G).sum(), (A, s, t))
        ref = [A.detach().clone().requires_grad_(), s.detach().clone().requires_grad_(),
               t.detach().clone().requires_grad_()]
        want_grads = torch.autograd.grad((_phm_blocks(*ref) * G).sum(), ref)
        for name, g, h in zip("Ast", grads, want_grads):
            assert torch.allclose(g, h, atol=1e-10), f"n={n}: the gradient in {name} is wrong"
        print(f"exercise_5: n={n}, W ({k}, {d}): equals the block assembly; gradients in A, s, t ok")
    d, m, n, adapters = 384, 64, 4, 12                              # MiniLM, Houlsby's 12 adapters
    dense = adapters * 2 * d * m
    compacter = n ** 3 + adapters * 2 * (m + d)                     # shared A + rank-one B per matrix
    print(f"exercise_5: MiniLM, 12 adapters of m={m} (weights only): dense {dense:,}, "
          f"Compacter n={n} {compacter:,} ({dense / compacter:.0f}x fewer). correct")
