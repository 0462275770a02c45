"""Everything `exec` does once admitted: launch the job, sample it, watch the limits, act (warn, pause, stop),
and record what happened."""
