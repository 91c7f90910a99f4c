"""Utilities of every layer: argument checks, progress bars, third-party compatibility.

Nothing here imports the rest of flatness.
"""
