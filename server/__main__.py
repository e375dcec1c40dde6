"""`python -m server ...` is the `deltaserve` command."""

from server.cli import command

command()
