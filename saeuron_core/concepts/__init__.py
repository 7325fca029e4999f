"""Learning concepts: per-timestep feature statistics and scores, and learning them through a pipeline."""
