"""Command line: `python -m pelib finetune | compare | bench ...` (`pelib ...` once installed).

    python -m pelib finetune --model minilm --data banking77 --method lora --r 8 --epochs 3
    python -m pelib compare --preset workshop      # every method side by side (`make run`)
    python -m pelib bench lora | quant | kernels   # ours vs the peer, in one process

This file only dispatches; the work is in pelib/finetune.py, pelib/compare.py and pelib/bench.
Errors a user can fix (a bad option, an unwritable folder, a stale checkpoint) are printed as one
line that names the fix, not as a traceback.
"""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    from .options import add_arguments

    p = argparse.ArgumentParser(prog="pelib", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("compare", help="every method side by side: `compare --preset workshop|full|smoke`")
    sub.add_parser("bench", help="benchmarks: `bench lora|quant|kernels` (see pelib/bench)")
    add_arguments(sub.add_parser("finetune", help="fine-tune a packaged backbone on a packaged "
                                                  "data set"))
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # subcommands with options of their own
        from .compare import main as compare_main

        try:
            compare_main(argv[1:])
        except KeyboardInterrupt:
            raise SystemExit("pelib: stopped; run the same command again to continue where it "
                             "stopped (finished runs are kept)") from None
    elif argv[:1] == ["bench"]:
        from .bench import main as bench_main

        bench_main(argv[1:])
    else:
        args = parser().parse_args(argv)
        from .finetune import finetune

        try:
            finetune(args)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise SystemExit(f"pelib: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
