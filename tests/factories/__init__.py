"""Shared test factories: servers, devices, bundles, reports and telemetry that several suites
build the same way. Test modules import from here, never from each other (tests/test_layout.py).
"""
