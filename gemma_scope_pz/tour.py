"""Deprecated alias of :mod:`gemma_scope_pz.app.tour` (kept one release).

For the offline dictionaries use ``gs.offline_dictionaries()``; for the tour ``gemma-scope-pz tour``.
"""

import warnings

from gemma_scope_pz.app.tour import TourSettings, offline_dictionaries, run_tour, tour_dictionaries

__all__ = ["TourSettings", "offline_dictionaries", "run_tour", "tour_dictionaries"]

warnings.warn(
    "gemma_scope_pz.tour moved to gemma_scope_pz.app.tour; use gs.offline_dictionaries()",
    DeprecationWarning,
    stacklevel=2,
)
