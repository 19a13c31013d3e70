"""Shared foundations: errors, config loading, digests, atomic writes, resource measurement.

Everything here is importable by every role (optimizer, server, edge agent), so it must stay
free of heavy imports.
"""
