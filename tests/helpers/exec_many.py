"""Runs `safegate exec` through the real CLI entry point once per exit status, in one interpreter, and prints
the codes as JSON: every status goes through parsing, the checks, the lock, a real job and its reaping,
without paying an interpreter start per status.

usage: exec_many.py CONFIG FIRST LAST
"""

import json
import sys

from safegate.cli.app import main

config, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
codes = [main(["exec", "--config", config, "--mem", "0", "--lock", f"code{code}", "-q", "--",
               "sh", "-c", f"exit {code}"]) for code in range(first, last + 1)]
print(json.dumps(codes))
