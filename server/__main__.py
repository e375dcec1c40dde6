"""`python -m server ...` is the `deltaserve` command."""

from server.cli import main

raise SystemExit(main())
