"""Erasing concepts at inference: the eraser (ablate, replace), its options and region masks."""
