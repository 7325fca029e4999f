"""Activation data for training SAEs: collection into sharded stores, online sources, multi-rank (torchrun) support."""
