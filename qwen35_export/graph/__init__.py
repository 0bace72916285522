"""Passes over exported FX graphs (one per file) and the ordered pipeline that runs them."""
