"""Instruction tuning: the answer-only loss equals transformers' own causal-LM loss, padding
sides are right, and constrained decoding can only write a label name."""
import pytest
import torch

import pelib
from pelib.sft import (
    AnswerTrie,
    answer_ids,
    collate_prompts,
    collate_train,
    encode,
    generate_answers,
    prompt_ids,
    sft_loss,
    shared_prefix,
)

NAMES = ["card_arrival", "lost_or_stolen_card", "card_not_working", "top_up_failed"]


@pytest.fixture(scope="module")
def tiny():
    return pelib.tiny_backbone("smollm2", task="causal_lm")


def test_the_loss_sits_on_the_answer_and_its_eos_only(tiny):
    _, tok = tiny
    ids, labels = encode(tok, "my card was stolen", "lost_or_stolen_card")
    n = len(prompt_ids(tok, "my card was stolen"))
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:] == answer_ids(tok, "lost_or_stolen_card")
    assert labels[-1] == tok.eos_token_id
    assert tok.decode(labels[n:-1]) == "lost or stolen card"
    assert "<|im_start|>assistant" in tok.decode(ids[:n])      # the model's own chat template


def test_sft_loss_and_gradients_equal_transformers_causal_lm_loss(tiny):
    model, tok = tiny
    rows = [encode(tok, "my card was stolen", "lost_or_stolen_card"),
            encode(tok, "where is the card I ordered last week?", "card_arrival")]
    batch = collate_train(rows, tok.pad_token_id)
    loss = sft_loss(model, batch, chunk=3)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref = model(**batch).loss                     # HF shifts, ignores -100, means over labels
    grads_ref = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, grads_ref):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_padding_sides():
    train = collate_train([([5, 6, 7], [-100, 6, 7]), ([5], [5])], pad_id=0)
    assert train["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert train["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    gen = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert gen["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert gen["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_the_trie_allows_exactly_the_continuations_of_some_answer():
    trie = AnswerTrie([[1, 2, 9], [1, 3, 9], [4, 9]])
    assert sorted(trie.next([])) == [1, 4]
    assert sorted(trie.next([1])) == [2, 3]
    assert trie.next([1, 2]) == [9]
    assert trie.next([7]) == []


def test_constrained_decoding_writes_only_names_and_left_padding_changes_nothing(tiny):
    model, tok = tiny
    texts = ["a", "my card has not arrived yet, what should I do", "top up", "help"]
    free = generate_answers(model, tok, texts, NAMES, batch_size=4)
    assert free.predictions.count(-1) >= 1            # a random model writes no name unaided
    batched = generate_answers(model, tok, texts, NAMES, constrained=True, batch_size=4)
    assert all(p >= 0 for p in batched.predictions)
    assert [NAMES[p].replace("_", " ") for p in batched.predictions] == batched.texts
    one_by_one = generate_answers(model, tok, texts, NAMES, constrained=True, batch_size=1)
    assert one_by_one.texts == batched.texts          # rows padded on the left decode alike


def test_an_answer_is_never_truncated(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="raise max_length"):
        encode(tok, "word " * 200, "card_arrival", max_length=64)


def test_the_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[7], [7, 8]]) == 0
    assert shared_prefix([[1, 2], [3, 2]]) == 0


@pytest.mark.parametrize("zero_shot", [False, True])
def test_a_shared_prefix_run_once_gives_the_answers_of_full_prompts(tiny, zero_shot):
    model, tok = tiny
    texts = ["a", "my card has not arrived yet, what should I do", "top up", "help"]
    prompts = [prompt_ids(tok, t, NAMES if zero_shot else None) for t in texts]
    assert shared_prefix(prompts) > 10               # the template and the question at least
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        shared = generate_answers(model, tok, texts, NAMES, zero_shot=zero_shot, batch_size=3)
    finally:
        hook.remove()
    full = generate_answers(model, tok, texts, NAMES, zero_shot=zero_shot, batch_size=3,
                            share_prefix=False)
    assert shared.texts == full.texts and shared.predictions == full.predictions
    longest_tail = max(len(p) for p in prompts) - shared_prefix(prompts)
    assert seen[0] == shared_prefix(prompts)          # the prefix, once
    assert max(seen[1:]) == longest_tail              # then only the rows' own tokens
