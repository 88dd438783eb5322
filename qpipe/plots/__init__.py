"""Pictures logged to MLflow: memory, per-layer plans, the Pareto front."""
