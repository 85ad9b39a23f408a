"""Solutions to notebook 11's exercises (and a plausible wrong answer for each)."""
import torch


def left_pad(prompts, pad_id):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    return {"input_ids": ids, "attention_mask": mask}


def right_pad(prompts, pad_id):  # the training side: generation would write after the pads
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    return {"input_ids": ids, "attention_mask": mask}


class _SmoothedCE(torch.autograd.Function):
    """loss_i = lse(z_i) - (1 - eps) z_i[y_i] - eps/V sum_j z_ij, so
    dloss_i/dz_i = softmax(z_i) - (1 - eps) e_{y_i} - eps/V."""

    @staticmethod
    def forward(ctx, h, W, y, eps, chunk, smooth_grad=True):
        keep = y != -100
        h_l, y_l = h[keep], y[keep]                        # (n, H), (n,)
        n, V = len(y_l), W.shape[0]
        dh_l, dW = torch.zeros_like(h_l), torch.zeros_like(W)
        total = h.new_zeros(())
        for s in range(0, n, chunk):
            h_c, y_c = h_l[s:s + chunk], y_l[s:s + chunk]
            z = h_c @ W.T                                  # (C, V)
            lse = z.logsumexp(1)
            total += (lse - (1 - eps) * z.gather(1, y_c[:, None])[:, 0] - eps / V * z.sum(1)).sum()
            dz = (z - lse[:, None]).exp()
            if smooth_grad:
                dz[torch.arange(len(y_c)), y_c] -= 1 - eps
                dz -= eps / V
            else:
                dz[torch.arange(len(y_c)), y_c] -= 1
            dz /= n
            dh_l[s:s + chunk] = dz @ W
            dW += dz.T @ h_c
        dh = torch.zeros_like(h)
        dh[keep] = dh_l
        ctx.save_for_backward(dh, dW)
        return total / n

    @staticmethod
    def backward(ctx, g):
        dh, dW = ctx.saved_tensors
        return g * dh, g * dW, None, None, None, None


def smoothed_linear_ce(h, W, y, eps, chunk):
    return _SmoothedCE.apply(h, W, y, eps, chunk)


def smoothed_loss_plain_gradient(h, W, y, eps, chunk):  # the loss smoothed, the gradient not
    return _SmoothedCE.apply(h, W, y, eps, chunk, False)


def answer_logprobs(model, prompt, answers):
    K, L = len(answers), max(map(len, answers))
    P = len(prompt)
    ids = torch.zeros((K, P + L), dtype=torch.long)
    mask = torch.zeros((K, P + L), dtype=torch.long)
    for k, a in enumerate(answers):                        # right padding
        ids[k, :P + len(a)], mask[k, :P + len(a)] = torch.tensor(prompt + a), 1
    logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)  # (K, P+L, V)
    pred = logp[:, P - 1:-1]                               # position t predicts token t + 1
    target = ids[:, P:]                                    # (K, L)
    per_token = pred.gather(2, target[:, :, None])[:, :, 0] * mask[:, P:]
    return per_token.sum(1)


def answer_logprobs_unshifted(model, prompt, answers):  # reads the logits at the answer's own tokens
    K, L, P = len(answers), max(map(len, answers)), len(prompt)
    ids = torch.zeros((K, P + L), dtype=torch.long)
    mask = torch.zeros((K, P + L), dtype=torch.long)
    for k, a in enumerate(answers):
        ids[k, :P + len(a)], mask[k, :P + len(a)] = torch.tensor(prompt + a), 1
    logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    per_token = logp[:, P:].gather(2, ids[:, P:, None])[:, :, 0] * mask[:, P:]
    return per_token.sum(1)


def _first_fit_decreasing(examples, capacity):
    bins = []                                              # [free tokens, [rows]]
    for j in sorted(range(len(examples)), key=lambda j: -len(examples[j][0])):
        n = len(examples[j][0])
        if n > capacity:
            raise ValueError(f"a conversation of {n} tokens exceeds capacity {capacity}")
        target = next((b for b in bins if b[0] >= n), None)
        if target is None:
            target = [capacity, []]
            bins.append(target)
        target[0] -= n
        target[1].append(j)
    return [rows for _, rows in bins]


def pack(examples, capacity, reset=True):
    packs = []
    for rows in _first_fit_decreasing(examples, capacity):
        ids = [t for j in rows for t in examples[j][0]]
        labels = [t for j in rows for t in examples[j][1]]
        pos = [q for j in rows for q in range(len(examples[j][0]))] if reset else list(range(len(ids)))
        packs.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                      "position_ids": torch.tensor(pos)})
    return packs


def pack_positions_run_on(examples, capacity):  # one position count per pack: RoPE sees one text
    return pack(examples, capacity, reset=False)


SOLUTIONS = {1: left_pad, 2: smoothed_linear_ce, 3: answer_logprobs, 4: pack}
WRONG = {1: right_pad, 2: smoothed_loss_plain_gradient, 3: answer_logprobs_unshifted,
         4: pack_positions_run_on}
