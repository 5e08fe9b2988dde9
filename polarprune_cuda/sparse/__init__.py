"""Gradual unstructured pruning: FGGP (exact to its authors' code), GMP, annealed; compressed sparse storage."""
from .fggp import FGGP, GMP, AnnealedPruner

__all__ = ["FGGP", "GMP", "AnnealedPruner"]
