"""Gradual unstructured pruning: FGGP (exact to its authors' code), GMP, annealed; compressed sparse storage."""
