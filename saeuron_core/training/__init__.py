"""Training TopK SAEs on stored or online activations."""
