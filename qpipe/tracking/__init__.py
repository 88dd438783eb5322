"""MLflow: the run store and its lock, the offline journal and its sync, stale-run marking."""
