"""The library version (one place; the package root and the manifest writer block read it)."""

__version__ = "0.1.0"
