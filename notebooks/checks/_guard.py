"""What every checker needs besides the reference: proof that the answer did not just call it.

    with forbidden((torch.nn.functional, "cross_entropy")):   # the reference is poisoned here
        got = answer(x)
    want = F.cross_entropy(x, y)                               # and works again here

    with triton_launches() as seen:                            # a Triton exercise must launch
        got = answer(x)                                        # a @triton.jit kernel that
    assert seen.n > 0 and seen.wrote(got)                      # writes the answer

A checker that compares an answer with a library function accepts that very function as an
answer; poisoning it while the answer runs closes that hole without hiding anything else.
"""
import contextlib


@contextlib.contextmanager
def forbidden(*targets):
    """Inside the block, calling any (object, attribute) in `targets` raises AssertionError."""
    saved = []

    def poison(label):
        def poisoned(*args, **kwargs):
            raise AssertionError(f"the answer calls {label}, the reference this checker compares "
                                 "against: build it from the notebook's pieces instead")
        return poisoned

    try:
        for obj, name in targets:
            owner = getattr(obj, "__name__", type(obj).__name__)
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, poison(f"{owner}.{name}"))
        yield
    finally:
        for obj, name, original in reversed(saved):
            setattr(obj, name, original)


class Launches:
    """What the @triton.jit launches inside a `triton_launches` block did: how many there were,
    and the storages of the tensors they were handed (where a kernel may have written)."""

    def __init__(self):
        self.n, self.storages = 0, set()

    def wrote(self, t) -> bool:
        """Was tensor t handed to a kernel (or a view of one that was)? An answer that computes
        in torch and launches a kernel on the side returns a tensor no kernel ever saw."""
        return t.untyped_storage().data_ptr() in self.storages


@contextlib.contextmanager
def triton_launches():
    """Records the @triton.jit kernel launches inside the block (compiled or interpreted)."""
    import torch
    from triton.runtime import interpreter, jit

    seen = Launches()
    classes = [jit.JITFunction, interpreter.InterpretedFunction]
    originals = [(cls, cls.run) for cls in classes]

    def recording(original):
        def run(self, *args, **kwargs):
            seen.n += 1
            seen.storages.update(a.untyped_storage().data_ptr() for a in (*args, *kwargs.values())
                                 if isinstance(a, torch.Tensor))
            return original(self, *args, **kwargs)
        return run

    try:
        for cls, original in originals:
            cls.run = recording(original)
        yield seen
    finally:
        for cls, original in originals:
            cls.run = original
