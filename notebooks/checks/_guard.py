"""What every checker needs besides the reference: proof that the answer did not just call it.

    with forbidden((torch.nn.functional, "cross_entropy")):   # the reference is poisoned here
        got = answer(x)
    want = F.cross_entropy(x, y)                               # and works again here

    with triton_launches() as n:                               # a Triton exercise must launch
        got = answer(x)                                        # a @triton.jit kernel
    assert n[0] > 0

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


@contextlib.contextmanager
def triton_launches():
    """Counts the @triton.jit kernel launches inside the block (compiled or interpreted): a
    one-element list, so the count can be read after the block."""
    from triton.runtime import interpreter, jit

    count = [0]
    classes = [jit.JITFunction, interpreter.InterpretedFunction]
    originals = [(cls, cls.run) for cls in classes]

    def counting(original):
        def run(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)
        return run

    try:
        for cls, original in originals:
            cls.run = counting(original)
        yield count
    finally:
        for cls, original in originals:
            cls.run = original
