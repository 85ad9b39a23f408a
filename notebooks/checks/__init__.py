"""Checkers for the notebooks' exercises: `checks.nbNN.exercise_k(answer)` asserts that the
learner's answer is right (against the notebook's own definitions, a pure-torch reference or a
peer library) and prints what it checked. Solutions live in notebooks/solutions/nbNN.py;
`make test` runs every checker on its solution (must pass) and on a wrong answer (must fail).
"""


def attempt(check, answer, *args, **kwargs) -> bool | None:
    """Run `check(answer, ...)` unless the answer is still the notebook's stub: a stub raises
    NotImplementedError, and the notebook says "not attempted yet" instead of failing.
    True when the check ran and passed; None (shown as nothing in a notebook) for a stub."""
    try:
        check(answer, *args, **kwargs)
    except NotImplementedError:
        name = getattr(check, "__name__", "exercise")
        print(f"{name}: not attempted yet (a solution: notebooks/solutions/)")
        return None
    return True
