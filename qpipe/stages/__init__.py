"""The pipeline's stages, one module each; every module exposes ``run(ctx) -> StageResult``."""
