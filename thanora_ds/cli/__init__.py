"""Console commands: ``thanora-train``, ``thanora-merge``, ``thanora-eval`` (also ``launchers/*.py``)."""
