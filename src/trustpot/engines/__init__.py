"""Reference engines that make labelled data: GFN2-xTB molecules, OpenMM NaCl in water, and a
charged N-body system, all written through the resumable labelling of
:mod:`trustpot.engines.labelling`. The engine modules import their packages lazily, so importing
this package costs nothing.
"""
