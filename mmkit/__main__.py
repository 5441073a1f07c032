"""`python -m mmkit` is the `mmkit` command."""

from mmkit.cli import main

main()
