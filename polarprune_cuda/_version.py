"""The version of polarprune_cuda (one place; the package, the spec and the report read it)."""
__version__ = "0.1.0"
