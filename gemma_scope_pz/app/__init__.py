"""The application layer: the command line (``cli``), the tour (``tour``) and its HTML report
(``report``). It calls only the public facade, ``import gemma_scope_pz as gs``."""
