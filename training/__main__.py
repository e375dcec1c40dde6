"""`python -m training train|import-peft ...`: the training commands without the server's CLI."""

from training.cli import main

raise SystemExit(main())
