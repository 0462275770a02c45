#!/usr/bin/env bash
# A plain bash gate doing the same five checks as `safegate check`, with standard tools.
# It is the baseline for bench/bench_check.py: every check does real work, none is skipped.
#
# Usage: bash_gate.sh [LOCK_DIR [LOCK_NAME [TEMP_FILE [PID_FILE]]]]
# Every argument can also come from the environment (arguments win):
#   SG_LOCK_DIR      directory of the lock file <LOCK_DIR>/<LOCK_NAME>.lock      (required)
#   SG_LOCK_NAME     lock name                                                  (default heavy)
#   SG_TEMP_FILE     sysfs-style temperature file in millidegrees C             (optional)
#   SG_PID_FILE      old-style pid lock file; removed when its pid is dead      (optional)
#   SG_NEED_BYTES    memory the job needs, bytes                                (default 0)
#   SG_MARGIN_BYTES  memory that must stay free after the need, bytes          (default 0)
#   SG_MAX_PRESSURE  max PSI memory "some avg10", percent, integer or 2 decimals (default 20)
#   SG_MAX_TEMP      block at or above this temperature, whole degrees C        (default 80)
#   SG_PATTERN       extended regex for competing processes (pgrep -f)          (default whisper.*large)
#   SG_SENSORS       auto: use `sensors` when installed, else TEMP_FILE; no: always TEMP_FILE
#
# Pass values that match SG_PATTERN (e.g. a lock named whisper-large) through the environment, not as
# arguments: arguments are part of this script's command line, which pgrep -f would otherwise see.
# (This script does exclude its own pid from pgrep's answer, as safegate excludes itself.)
#
# Exit codes, as safegate: 0 safe, 10 memory, 12 too hot, 13 lock held, 14 competing process;
# when several checks fail the lowest code wins. 2: usage error.

set -u

lock_dir=${1:-${SG_LOCK_DIR:-}}
lock_name=${2:-${SG_LOCK_NAME:-heavy}}
temp_file=${3:-${SG_TEMP_FILE:-}}
pid_file=${4:-${SG_PID_FILE:-}}
need=${SG_NEED_BYTES:-0}
margin=${SG_MARGIN_BYTES:-0}
max_pressure=${SG_MAX_PRESSURE:-20}
max_temp=${SG_MAX_TEMP:-80}
pattern=${SG_PATTERN:-whisper.*large}
use_sensors=${SG_SENSORS:-auto}

if [[ -z $lock_dir ]]; then
    echo "bash_gate: no lock dir (argument 1 or SG_LOCK_DIR)" >&2
    exit 2
fi
for value in "$need" "$margin" "$max_temp"; do
    if [[ ! $value =~ ^[0-9]+$ ]]; then
        echo "bash_gate: SG_NEED_BYTES, SG_MARGIN_BYTES and SG_MAX_TEMP must be whole numbers, got '$value'" >&2
        exit 2
    fi
done
if [[ ! $max_pressure =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "bash_gate: SG_MAX_PRESSURE must be a percentage like 20 or 12.5, got '$max_pressure'" >&2
    exit 2
fi

code=0
fail() {  # fail CODE MESSAGE: remember the lowest failing code
    echo "bash_gate: $2" >&2
    if (( code == 0 || $1 < code )); then code=$1; fi
}

# 5. Stale lock cleanup: a pid file whose process is gone is removed.
if [[ -n $pid_file && -f $pid_file ]]; then
    pid=
    read -r pid < "$pid_file" || true
    if [[ $pid =~ ^[0-9]+$ ]] && (( pid > 0 )); then
        # kill -0 fails for a dead pid, and also for a live one we may not signal (EPERM): /proc tells.
        if ! kill -0 "$pid" 2>/dev/null && [[ ! -d /proc/$pid ]]; then
            rm -f -- "$pid_file"
        fi
    fi
fi

# 1. Memory: MemAvailable (free's "available" column) minus the need must leave the margin ...
if ! free -b | awk -v need="$need" -v margin="$margin" \
        '/^Mem:/ { found = 1; ok = ($7 - need >= margin) } END { exit !(found && ok) }'; then
    fail 10 "memory: MemAvailable - need < margin"
fi
# ... and PSI memory "some avg10" must be at most the limit (the file is absent on old kernels: pass).
hundredths() {  # hundredths 12.3 -> 1230 (into $REPLY): bash has no floating point
    local whole=${1%%.*} frac=
    [[ $1 == *.* ]] && frac=${1#*.}
    frac=${frac}00
    REPLY=$(( 10#${whole:-0} * 100 + 10#${frac:0:2} ))
}
if [[ -r /proc/pressure/memory ]]; then
    hundredths "$max_pressure"; limit=$REPLY
    while read -r kind avg10 _; do
        [[ $kind == some ]] || continue
        avg10=${avg10#avg10=}                      # e.g. 12.34
        hundredths "$avg10"
        if (( REPLY > limit )); then
            fail 10 "memory pressure some avg10 $avg10% > $max_pressure%"
        fi
    done < /proc/pressure/memory
fi

# 2. Temperature: the hottest sensor must be below the limit.
hottest=
if [[ $use_sensors != no ]] && command -v sensors >/dev/null 2>&1; then
    # lm-sensors raw output: "  temp1_input: 45.000"; keep the highest, in millidegrees.
    hottest=$(sensors -u 2>/dev/null | awk '/_input:/ { v = int($2 * 1000); if (!seen || v > max) max = v; seen = 1 }
                                           END { if (seen) print max }')
fi
if [[ -z $hottest && -n $temp_file ]]; then
    hottest=$(cat -- "$temp_file" 2>/dev/null)
fi
if [[ $hottest =~ ^-?[0-9]+$ ]]; then
    if (( hottest >= max_temp * 1000 )); then
        fail 12 "temperature $((hottest / 1000)) C >= $max_temp C"
    fi
fi  # no readable sensor: not blocking, as safegate without [thermal] require

# 3. Lock: the flock on <lock_dir>/<name>.lock must be free (a missing lock file is a free lock).
lock_file=$lock_dir/$lock_name.lock
if [[ -e $lock_file ]]; then
    # flock -n takes the lock on fd 9 without waiting; closing fd 9 after the block releases it.
    if ! { flock -n 9; } 9<"$lock_file"; then
        fail 13 "lock $lock_name is held ($lock_file)"
    fi
fi

# 4. Competing process: any process whose full command line matches the pattern, except this one.
competing=
while read -r pid; do
    [[ -n $pid && $pid != "$$" ]] && competing+=" $pid"
done < <(pgrep -f -- "$pattern")
if [[ -n $competing ]]; then
    fail 14 "competing process running: pid$competing"
fi

exit "$code"
