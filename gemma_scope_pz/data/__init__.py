"""Text data: corpora (including the offline default corpus) and packing them into token contexts.

``corpus.py`` holds ``Corpus``, ``load_corpus`` and ``default_corpus``; ``offline.py`` gathers the
offline default corpus's texts (Python's documentation); ``prose.py`` the optional English prose
from Debian packages (``load_corpus("default+prose")``); ``packing.py`` cuts documents into
BOS-led contexts.
"""
