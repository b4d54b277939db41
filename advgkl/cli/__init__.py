"""The `advgkl` command: a handler per subcommand (`commands`, each importing what it needs so
that `advgkl --version` and `advgkl config` start fast) and one small parser per command
(`parsers`)."""

from advgkl.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
