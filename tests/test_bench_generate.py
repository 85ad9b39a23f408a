"""bench generate on the real SmolLM2-135M-Instruct: the shared-prefix answers are the answers of
the whole prompts (the benchmark counts them), and its figures are consistent."""
import json

import pytest

from pelib.bench.generate import main

pytestmark = pytest.mark.integration  # loads the packaged model


def test_the_shared_prefix_writes_the_answers_of_whole_prompts(capsys):
    main(["--rows", "3", "--batch", "2", "--repeats", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["identical_answers"] == out["rows"] == 3
    assert 0 < out["shared_prefix_tokens"] < out["prompt_tokens_mean"]
    assert out["prompt_pass_speedup_limit"] > 1
