"""`python -m attnlab ...` (and `torchrun -m attnlab train ...`) run the command-line tool."""

from .app.cli import main

raise SystemExit(main())
