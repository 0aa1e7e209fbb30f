"""``python -m normzoo`` (and ``torchrun -m normzoo``) run the CLI."""

from normzoo.cli import main

main()
