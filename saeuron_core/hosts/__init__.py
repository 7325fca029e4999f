"""Reaching into models: block hooks on any torch module, and diffusers pipelines (loading, schedulers, generation)."""
