"""`python -m perfit ...` (what `torchrun -m perfit run ...` starts on every rank)."""
import sys

from .cli import main

sys.exit(main())
