"""bench train-step refuses options that cannot run, before it loads a model."""
import pytest

from pelib.bench.train_step import main


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["--batch", "-5"], "argument --batch: must be an integer >= 1"),
    (["--tokens", "0"], "argument --tokens: must be an integer in [1, 8192]"),
    (["--tokens", "100000"], "argument --tokens: must be an integer in [1, 8192]"),
    (["--r", "0"], "argument --r: must be an integer >= 1"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["--base-dtype", "bfloat16"], "add --bf16"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
