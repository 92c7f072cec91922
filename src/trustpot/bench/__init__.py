"""Benchmarks as library code: the compositional out-of-domain benchmark (GMD-26), and
far-from-data probe paths of any molecule (:mod:`trustpot.bench.paths`).

``trustpot bench compositional`` (:mod:`trustpot.cli.bench`) is a thin layer over
:func:`trustpot.bench.compositional.run_compositional`.
"""
