"""Tell systemd the service is up once the job runs (sd_notify's READY=1, for a unit with Type=notify).

With Type=notify the unit stays "activating" until safegate says READY=1, so the wait in line is the unit's start
and TimeoutStartSec= bounds it; with Type=simple or exec the unit is active at once and nothing covers a hung
wait but safegate's own --timeout. Sent once, after the job was started under the lock; never when safegate gave
up in line or the job could not start (the unit then fails with safegate's exit status). The job's environment
is left as the caller's: with systemd's default NotifyAccess=main only safegate, the main process, is heard.
A safegate that is not the process systemd started ($SYSTEMD_EXEC_PID) sends nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from safegate.units import printable

STATUS_LIMIT = 200  # characters of the STATUS= line `systemctl status` shows


def service_ready(status: str, env: Mapping[str, str] | None = None) -> str | None:
    """Send READY=1 and STATUS=*status* to $NOTIFY_SOCKET. None when sent or not asked for (no NOTIFY_SOCKET),
    else why not (one line, for a warning: systemd will then end the unit at TimeoutStartSec=)."""
    env = os.environ if env is None else env
    given = env.get("NOTIFY_SOCKET", "")
    if not given:
        return None
    # systemd (248 and later) names the process it started; a safegate that is not it (run by the unit's own
    # script, say) says nothing: the unit's main process decides when the unit is up.
    started = env.get("SYSTEMD_EXEC_PID", "")
    if started and started != str(os.getpid()):
        return None
    if given.startswith("@"):  # the abstract namespace
        address = "\0" + given[1:]
    elif given.startswith("/"):
        address = given
    else:
        return f"cannot tell systemd the service is ready: NOTIFY_SOCKET {printable(given)!r} is no socket path"
    import socket  # only under systemd: not on check's path

    text = printable(status)[:STATUS_LIMIT]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(f"READY=1\nSTATUS={text}".encode())
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"cannot tell systemd the service is ready: {reason} (NOTIFY_SOCKET {printable(given)})"
    return None
