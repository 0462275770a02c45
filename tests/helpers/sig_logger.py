"""Logs the signals it gets, one name a line, to FILE, as programs that log their signals do.

usage: sig_logger.py FILE NAMES [stop] [exit=NAME] [stop-on=NAME]

NAMES: the signals it handles, comma-separated without the SIG prefix (TERM,CONT). It writes "ready" once its
handlers are in place; with "stop" it then stops itself (SIGSTOP). exit=NAME: exits 0 after logging NAME.
stop-on=NAME: after logging NAME stops itself with SIGSTOP, as a program that saves its state on SIGTSTP does.
Otherwise it runs until killed.
"""

import os
import signal
import sys
import time

path, names, *options = sys.argv[1:]
opts = dict(option.partition("=")[::2] for option in options)


def log(text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (text + "\n").encode())
    os.close(fd)


def on_signal(signum: int, _frame: object) -> None:
    name = signal.Signals(signum).name[3:]
    log(name)
    if name == opts.get("stop-on"):
        os.kill(os.getpid(), signal.SIGSTOP)
    if name == opts.get("exit"):
        sys.exit(0)


for name in names.split(","):
    signal.signal(getattr(signal, "SIG" + name), on_signal)
log("ready")
if "stop" in opts:
    os.kill(os.getpid(), signal.SIGSTOP)
while True:
    time.sleep(0.05)
