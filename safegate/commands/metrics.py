"""`metrics`: the status report and exec's history as Prometheus text, and the textfile collector's atomic write."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from safegate.config.file import load_config
from safegate.errors import UsageError
from safegate.probes.gpu import gpu_backend


def metrics(config: str | None) -> str:
    from safegate.commands.prometheus import prometheus_text
    from safegate.commands.reports import collect_status
    from safegate.config import history
    from safegate.locks.directory import resolve_lock_dir

    cfg = load_config(config)
    report = collect_status(cfg, resolve_lock_dir(cfg.lock_dir, os.environ), gpu_backend(cfg.gpu_backend, os.environ))
    return prometheus_text(report, history.load(history.history_path()))


TEXTFILE = "safegate.prom"


def write_textfile(directory: str, text: str) -> Path:
    """Write DIR/safegate.prom as node_exporter wants it: whole or not at all (a temp file, then a rename)."""
    target = Path(directory)
    if not target.is_dir():
        raise UsageError(f"--textfile: {directory!r} is not a directory; expected node_exporter's textfile "
                         "collector directory")
    temp = target / f".{TEXTFILE}.{os.getpid()}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temp, target / TEXTFILE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise UsageError(f"--textfile: cannot write {target / TEXTFILE}: {exc.strerror}") from None
    return target / TEXTFILE
