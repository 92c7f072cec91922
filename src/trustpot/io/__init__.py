"""Checkpoints and files."""
