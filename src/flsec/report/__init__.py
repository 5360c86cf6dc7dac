"""Self-contained HTML report of a pipeline run (matplotlib figures embedded as PNG)."""
