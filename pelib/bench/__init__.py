"""Benchmarks (never tests): ours against a peer measured in the same run, and the limit.

    python -m pelib bench lora [--steps 60] [--threads 1] [--r 8]      pelib LoRA vs peft LoRA, ms/step
    python -m pelib bench quant [--n 4096] [...]                        NF4 dequant vs bitsandbytes (CPU)
    python -m pelib bench kernels [--gpu] [--out DIR]                  Triton kernels vs torch eager
    python -m pelib bench train-step [--model smollm2] [--method qlora] one method's step: time, memory
    python -m pelib bench sft-loss [--batch 16] [--tokens 64]         the LM head + loss, chunked vs not
    python -m pelib bench generate [--rows 32] [--zero-shot]           answers, shared prompt prefix vs not

One module per benchmark (lora, quant, kernels with qlora_step, train_step, sft_loss,
generate), all measured by pelib.measure: one alternating-median timer, one peak-memory helper,
the limit from measured rates. Each prints three numbers: ours, the peer's, and the physical limit.
`python -m pelib.bench ...` is the same entry point.
"""
from importlib import import_module

COMMANDS = {"lora": "lora", "quant": "quant", "kernels": "kernels", "train-step": "train_step",
            "sft-loss": "sft_loss", "generate": "generate"}


def main(argv: list[str]) -> None:
    """Run the benchmark named by argv[0] with the options that follow."""
    what, rest = (argv[0], argv[1:]) if argv else ("", [])
    if what not in COMMANDS:
        raise SystemExit(f"usage: python -m pelib bench {{{','.join(COMMANDS)}}} [options]; "
                         "see `python -m pelib bench lora --help`")
    import_module(f"{__name__}.{COMMANDS[what]}").main(rest)  # each imports its peer only when run
