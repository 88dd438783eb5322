"""The composed Hydra config: its schema, composition, search path and the typed settings resolved once per run."""
