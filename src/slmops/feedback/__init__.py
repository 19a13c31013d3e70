"""The feedback loop: field signals to the next optimized version (improvement jobs)."""
