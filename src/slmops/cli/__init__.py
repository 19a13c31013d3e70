"""Thin Typer commands over the same engines the server and tests use."""
