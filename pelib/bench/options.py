"""The benchmarks' command-line options: one-line errors that name the option and the fix.

    p = Parser(prog="pelib bench lora")
    p.add_argument("--steps", type=int_at_least(3, "2 warm-up steps and at least 1 timed"), default=60)

argparse puts the option's name before the message of a `type=` validator, so a bad value
ends as `pelib bench lora: error: argument --steps: must be an integer >= 3 (...), got 0`.
"""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse that prints an error as one line (no usage block above it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def int_at_least(low: int, why: str = "", high: int | None = None):
    """A `type=` for an integer in [low, high] (high: None for no upper bound)."""
    span = f">= {low}" if high is None else f"in [{low}, {high}]"
    why = f" ({why})" if why else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {span}{why}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {span}{why}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
thread_count = int_at_least(1, "CPU threads for torch.set_num_threads")
