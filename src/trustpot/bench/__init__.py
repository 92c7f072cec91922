"""Benchmarks as library code: the compositional out-of-domain benchmark (GMD-26).

``trustpot bench compositional`` (:mod:`trustpot.cli.bench`) is a thin layer over
:func:`trustpot.bench.compositional.run_compositional`.
"""
