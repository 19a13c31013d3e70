"""The evaluate stage: quality against the reference, performance under device-profile limits,
per-profile selection, the report, the CI gate and the cost estimate."""
