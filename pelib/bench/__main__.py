"""`python -m pelib.bench <what> [...]`, the same as `python -m pelib bench <what> [...]`."""
import sys

from . import main

main(sys.argv[1:])
