"""The commands layer: one function per CLI command, between the parser (cli.py) and the core.

Each takes parsed values, orchestrates the core (config, gate, lock store, runner, slurm) and returns a typed
result; it never prints or exits. cli.py renders what comes back, and main() turns errors into exit codes.
"""
