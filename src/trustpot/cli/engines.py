"""``trustpot data molecules | label | nacl-water | nbody``: reference-engine data generation."""

from __future__ import annotations

import argparse


def add_engine_commands(data_sub: argparse._SubParsersAction) -> None:
    """Register the engine subcommands under ``trustpot data``."""
