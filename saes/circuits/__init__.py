"""Circuits through transcoders: per-layer transcoders for a whole model, attribution graphs, weights-based connections."""

from saes.circuits.layers import Transcoders, load_transcoders, train_transcoders

__all__ = ["Transcoders", "load_transcoders", "train_transcoders"]
