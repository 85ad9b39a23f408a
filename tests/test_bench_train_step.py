"""bench train-step refuses options that cannot run, before it loads a model."""
import pytest

from pelib.bench.train_step import main


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch", "-5"], "--batch must be at least 1"),
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--r", "0"], "--r must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--base-dtype", "bfloat16"], "add --bf16"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
