"""Hardware: named GPU specs, per-card planning, peak-memory measurement, GPU slots, OOM handling, machine facts."""
