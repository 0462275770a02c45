"""Named locks in a shared directory: flock(2) on <dir>/<name>.lock, holder metadata beside it.

The lock file is locked with flock(2) (the stdlib's fcntl.flock, one primitive for taking, testing and waiting),
so `flock(1)` on the same file excludes too. safegate opens every file itself, with O_NOFOLLOW,
so a planted symlink is refused instead of followed, and never unlinks a lock file: unlinking splits
waiters across inodes.

Holder metadata (<name>.holder-<pid>.<start>-<token>.json, one file per holder, the token random) names who holds the
lock and what it reserves. It is written atomically (temp file + rename) after the flock is taken and removed
before it is released. Anyone can write such a file in the shared dir, so a record counts only while its
writer holds the flock (per /proc/locks) and the file belongs to that writer's user; any other is ignored, and
cleanup removes the ones whose process is gone, where it may.

The modules, one job each:
  files    the lock dir (where, whether safe, its names), the O_NOFOLLOW open, flock(2) primitives, probing,
           who holds a lock (/proc/locks), the admission lock
  holders  holder metadata: the Holder record, its JSON, reading, writing, removing it; stale files' cleanup
  legacy   old-style PID lock files, as shell gates write them
  store    LockStore (taking a lock, reading its holder and state), HeldLock, the reservations of held locks
  backoff  the one wait loop (attempt, pause, until a deadline)
Reading never writes: only ensure_directory, taking a lock, and the cleanup functions change the lock dir.
"""
