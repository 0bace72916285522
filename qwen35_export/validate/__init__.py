"""Numerical checks of an engine against the PyTorch reference: per layer, end to end, with a report."""
