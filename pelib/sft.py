"""Instruction tuning (supervised fine-tuning, SFT): a classification task posed as generation.

A chat LLM is not given a new head. Each row becomes a conversation in the model's own chat
template: the user's turn asks for the intent of a message, the assistant's turn is the intent's
name (underscores as spaces) followed by the end-of-turn token. Training is next-token
prediction on the assistant's tokens only:

    input_ids = [prompt ........][answer ...][eos]
    labels    = [-100 ..........][answer ...][eos]     (-100: no loss, F.cross_entropy's ignore)

Batches are padded on the right for training (pads get label -100 and attention 0) and on the
left for generation, so that every row's next token is written at the same position. The tokens
every prompt starts with (the template's system turn, the question; for zero-shot also the list
of names, most of the prompt) are run once: their KV cache is copied for every batch, and only
each row's own tokens, left padded after that shared prefix, are computed per row.

Evaluation generates greedily and scores exact matches against the label names; an output that
is no name counts as invalid (and wrong). Constrained decoding lets the model emit only tokens
that continue some name: a prefix trie of the names' token ids, queried at every step through
`generate(prefix_allowed_tokens_fn=...)`, so every output is a valid name.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .linear_ce import IGNORE_INDEX, labelled_rows, linear_cross_entropy, shift_for_next_token

QUESTION = "Which banking intent does this customer message express?\nMessage: {text}"
ZERO_SHOT = ("Which banking intent does this customer message express? Answer with exactly one "
             "intent from this list: {names}.\nMessage: {text}")


def answer_text(label_name: str) -> str:
    """The assistant's answer for a label: `card_arrival` -> `card arrival`."""
    return label_name.replace("_", " ")


def prompt_ids(tokenizer, text: str, names: list[str] | None = None) -> list[int]:
    """The chat up to the assistant's turn (the template's generation prompt). With `names`, the
    zero-shot prompt that lists every answer."""
    content = (QUESTION.format(text=text) if names is None else
               ZERO_SHOT.format(text=text, names=", ".join(answer_text(n) for n in names)))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def answer_ids(tokenizer, label_name: str) -> list[int]:
    """The answer's tokens and the end-of-turn token that closes it."""
    return tokenizer(answer_text(label_name), add_special_tokens=False).input_ids + \
        [tokenizer.eos_token_id]


def encode(tokenizer, text: str, label_name: str, max_length: int = 128):
    """(input_ids, labels) of one training conversation; the loss sits on the answer only. The
    prompt is cut from the left of the message if too long, never the answer."""
    a = answer_ids(tokenizer, label_name)
    p = prompt_ids(tokenizer, text)
    if len(p) + len(a) > max_length:
        raise ValueError(f"a prompt of {len(p)} tokens and an answer of {len(a)} exceed "
                         f"max_length {max_length}: raise max_length")
    return p + a, [IGNORE_INDEX] * len(p) + a


def collate_train(rows, pad_id: int):
    """Right padding: rows of (input_ids, labels) -> input_ids, attention_mask, labels (B, T)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, leaving every prompt at least one of its own
    (generation needs one uncached token per row to start from)."""
    first, most = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < most and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def collate_prompts(prompts: list[list[int]], pad_id: int):
    """Left padding: prompts -> input_ids, attention_mask (B, T), every row ending at T - 1."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    return {"input_ids": ids, "attention_mask": mask}


def sft_loss(model, batch, chunk: int = 1024) -> torch.Tensor:
    """The answer-only next-token loss of a causal LM, with the LM head applied only to labelled
    positions, in chunks (pelib.linear_ce): the B x T x V logits are never made."""
    hidden = model.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    h, y = labelled_rows(*shift_for_next_token(hidden, batch["labels"]))           # (n, H), (n,)
    return linear_cross_entropy(h, model.lm_head.weight, y, chunk=chunk)


class AnswerTrie:
    """The token sequences of the allowed answers as a prefix trie: `next(prefix)` is the set of
    tokens that continue some answer after `prefix` (an answer ends with the eos token)."""

    def __init__(self, sequences: list[list[int]]):
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})

    def next(self, prefix: list[int]) -> list[int]:
        node = self.root
        for t in prefix:
            node = node.get(t)
            if node is None:
                return []
        return list(node)


@dataclass
class Generated:
    texts: list[str]        # what the model wrote, eos and padding removed
    predictions: list[int]  # index into the label names, -1 when the text is no name


def generate_answers(model, tokenizer, texts: list[str], label_names: list[str], *,
                     constrained: bool = False, zero_shot: bool = False, batch_size: int = 32,
                     max_new_tokens: int | None = None, share_prefix: bool = True,
                     progress: bool = False) -> Generated:
    """Greedy decoding (with the KV cache) of the answer to each text, batch by batch, left
    padded. `constrained`: only tokens that continue one of the label names. `zero_shot`: the
    prompt lists the names (prompt_ids with names), for a model no training taught them.
    `share_prefix`: run the prompts' common leading tokens once and start every batch from a
    copy of their cache (rows are then [prefix][pads][own tokens]; the positions come from the
    attention mask, so the answers are those of full prompts)."""
    answers = [answer_ids(tokenizer, n) for n in label_names]
    by_text = {answer_text(n): i for i, n in enumerate(label_names)}
    trie = AnswerTrie(answers) if constrained else None
    max_new = max_new_tokens or max(len(a) for a in answers) + 2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [prompt_ids(tokenizer, t, label_names if zero_shot else None) for t in texts]
    out_texts, preds = [], []
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        P = shared_prefix(prompts) if share_prefix and prompts else 0
        prefix = torch.tensor([prompts[0][:P]], dtype=torch.long, device=device)   # (1, P)
        if P:
            with torch.no_grad():
                prefix_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).cache
        for s in tqdm(range(0, len(prompts), batch_size), desc="answers", unit="batch",
                      disable=not progress, dynamic_ncols=True):
            tails = collate_prompts([p[P:] for p in prompts[s:s + batch_size]], pad)
            B = tails["input_ids"].shape[0]
            ids = torch.cat([prefix.expand(B, -1), tails["input_ids"].to(device)], 1)  # (B, T)
            mask = torch.cat([torch.ones(B, P, dtype=torch.long, device=device),
                              tails["attention_mask"].to(device)], 1)
            cache = None
            if P:
                cache = copy.deepcopy(prefix_cache)    # generate appends to the cache it is given
                cache.batch_repeat_interleave(B)
            T = ids.shape[1]

            def allowed(_, ids, T=T):
                nxt = trie.next(ids[T:].tolist())
                return nxt or [eos]        # a finished answer: only eos (then padding)

            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                                     do_sample=False, max_new_tokens=max_new,
                                     eos_token_id=eos, pad_token_id=pad,
                                     prefix_allowed_tokens_fn=allowed if constrained else None)
            for row in out[:, T:].tolist():
                row = row[:row.index(eos)] if eos in row else row
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                out_texts.append(text)
                preds.append(by_text.get(text, -1))
    finally:
        model.train(was_training)
    return Generated(out_texts, preds)
