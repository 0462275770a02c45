"""The command line: parse, call a command, render. Empty on purpose: `safegate check` (cli.fastpath) must not
import the typer app (cli.app)."""
