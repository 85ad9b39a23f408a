"""Bad arguments to the Python API end in one ValueError that names the argument and the fix,
before anything is built or trained; each case below was once accepted (a silent wrong result)
or ended in a traceback deep inside torch, transformers or csv."""
import math

import pytest

import pelib
from pelib.adalora import RankAllocator, apply_adalora
from pelib.data import NLUSplit, load_nlu
from pelib.settings import check_data
from pelib.train import TrainConfig

TG = ["query", "key", "value", "dense"]


def tiny():
    return pelib.tiny_backbone("minilm", 5, with_tokenizer=False)[0]


@pytest.mark.parametrize("targets, words", [
    ([], "target_modules"), (None, "target_modules"), (5, "target_modules"),
    ([5], "entries must be module names"), (["query", None], "entries must be module names"),
])
def test_apply_lora_refuses_targets_that_name_no_module(targets, words):
    model = tiny()
    with pytest.raises(ValueError, match=words):
        pelib.apply_lora(model, targets)
    assert getattr(model, "pelib_adapter", None) is None  # nothing was injected


@pytest.mark.parametrize("kwargs, words", [
    (dict(alpha="16"), "alpha must be a number"), (dict(dropout="0.1"), "dropout must be a number"),
    (dict(r=2.5), "r must be a positive integer"), (dict(r="4"), "r must be a positive integer"),
    (dict(alpha=True), "alpha must be a number"),
])
def test_apply_lora_refuses_arguments_of_the_wrong_type(kwargs, words):
    with pytest.raises(ValueError, match=words):
        pelib.apply_lora(tiny(), TG, **kwargs)


def test_apply_lora_alpha_none_is_twice_the_rank():
    model = pelib.apply_lora(tiny(), TG, r=4, alpha=None)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.alpha == 8 and layer.scaling == 2.0


@pytest.mark.parametrize("num_labels", [0, 1, 2.5, "5", None, True])
def test_backbones_refuse_num_labels_that_are_not_a_count_of_classes(num_labels):
    with pytest.raises(ValueError, match="num_labels"):
        pelib.tiny_backbone("minilm", num_labels, with_tokenizer=False)
    with pytest.raises(ValueError, match="num_labels"):  # before any weight is read
        pelib.load_backbone("minilm", num_labels)


@pytest.mark.parametrize("kwargs, words", [
    (dict(lr="1e-3"), "lr must be a number"), (dict(batch_size=2.5), "batch_size must be an integer"),
    (dict(batch_size="8"), "batch_size must be an integer"), (dict(epochs="3"), "epochs must be a number"),
    (dict(seed=None), "seed must be an integer"), (dict(lr=math.nan), "lr must be a finite number"),
])
def test_train_config_refuses_wrong_types_at_construction(kwargs, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**kwargs)


def test_train_config_takes_ints_for_floats():
    assert TrainConfig(lr=1, epochs=2).lr == 1


def test_training_data_must_fit_the_head_and_have_two_classes():
    names = [f"c{i}" for i in range(77)]
    data = NLUSplit(["a", "b", "c"], [0, 76, 3], names)
    with pytest.raises(ValueError, match=r"outside the model's num_labels=5 .*num_labels=77"):
        check_data(5, {"train_data": data})
    with pytest.raises(ValueError, match="eval_data has labels"):
        check_data(77, {"train_data": data, "eval_data": NLUSplit(["x"], [80], names)})
    one = NLUSplit(["a", "b"], [2, 2], names)
    with pytest.raises(ValueError, match="single label"):
        check_data(5, {"train_data": one})
    check_data(77, {"train_data": data, "eval_data": one})  # an eval split may hold one class


def test_train_refuses_data_the_head_cannot_hold():
    """pelib.train.train checks the data against the head before anything trains."""
    model, tok = pelib.tiny_backbone("minilm", num_labels=5)
    names = [f"c{i}" for i in range(77)]
    data = NLUSplit(["a b", "c d", "e f"], [0, 76, 3], names)
    cfg = pelib.TrainConfig(epochs=1, batch_size=2, max_length=8, progress=False)
    with pytest.raises(ValueError, match=r"num_labels=5"):
        pelib.train.train(model, tok, data, data, cfg)
    one = NLUSplit(["a b", "c d"], [2, 2], names)
    with pytest.raises(ValueError, match="single label"):
        pelib.train.train(model, tok, one, one, cfg)


def test_rank_allocator_refuses_a_weight_that_is_not_a_finite_number():
    model = apply_adalora(tiny(), TG, init_r=4)
    for w in (math.nan, math.inf, -1.0, "0.5"):
        with pytest.raises(ValueError, match="orth_reg_weight must be a finite number"):
            RankAllocator(model, target_r=2, orth_reg_weight=w)
    assert RankAllocator(model, target_r=2, orth_reg_weight=0).orth_reg_weight == 0


def test_load_nlu_without_a_seed_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="seed must be an integer.*seed=0"):
        load_nlu("banking77", "train", limit=5, seed=None)
    a, b = (load_nlu("banking77", "train", limit=5, seed=3) for _ in range(2))
    assert a == b


def _folder(tmp_path, raw: bytes):
    (tmp_path / "banking77").mkdir(exist_ok=True)
    (tmp_path / "banking77" / "train.tsv").write_bytes(raw)
    return tmp_path


@pytest.mark.parametrize("raw", ["text\tlabel\ncaf\u00e9\ta\nb\tb\n".encode("latin-1"),
                                 b"text\tlabel\n\xff\xfe\x80\x81\ta\n"])
def test_a_data_file_not_in_utf8_is_named_with_the_fix(tmp_path, raw):
    with pytest.raises(ValueError, match=r"banking77/train.tsv: byte \d+ is not UTF-8.*iconv"):
        load_nlu("banking77", "train", data_dir=_folder(tmp_path, raw))


def test_a_header_with_spaces_around_the_names_reads_like_the_plain_one(tmp_path):
    spaced = load_nlu("banking77", "train", data_dir=_folder(tmp_path, b"text \t label\nhi\ta\nyo\tb\n"))
    assert spaced == NLUSplit(["hi", "yo"], [0, 1], ["a", "b"])


def test_a_data_dir_of_ones_own_that_does_not_exist_says_what_it_should_hold(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no banking77/train.tsv: a data folder holds") as e:
        load_nlu("banking77", "train", data_dir=tmp_path / "missing")
    assert "git" not in str(e.value)
