"""The gate: settings resolved (preflight), the checks as pure policy over snapshots (policy, competing, results),
the line of waiters (fairness, queue, watch), admission under the machine-wide lock, and check's grant."""
