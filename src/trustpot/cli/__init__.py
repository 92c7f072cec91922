"""The ``trustpot`` command."""
