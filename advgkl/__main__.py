"""`python -m advgkl` (and `torchrun -m advgkl`) runs the command-line interface."""

from advgkl.cli import main

raise SystemExit(main())
