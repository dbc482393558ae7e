"""Crucible: shared base utilities (typed config loading, errors, CLI, logging, provenance).

The four stage packages (``data_pipeline``, ``model``, ``training``, ``launcher``) depend on
this package; it depends on none of them.
"""

__version__ = "0.1.0"
