"""Telemetry on the control plane (issue 6): ingest, roll up, query, gate, watch.

Modules: ``tables`` (rows), ``store`` (writing a batch idempotently, roll-up, retention),
``ingest`` (POST /device/v1/telemetry), ``aggregate`` (merging and derived figures, pure),
``rows`` (reading a range: whole hours from the roll-up, edges from windows), ``query``
(``summarize``, the dashboard's contract), ``routes`` (GET /api/v1/telemetry, /api/v1/alerts;
their bodies in ``schemas``), ``cohorts`` (canary/baseline figures for rollout metric gates,
``feed_metrics``), ``drift`` (PSI against the bundle's baseline, ``check_drift``), ``metrics``
(GET /metrics).

Hooks for the ticker (``server/ticker.py``, through ``ticks.telemetry_tick``):
``feed_metrics(session, ctx)`` every tick, and ``check_drift(session, store)`` now and then.
"""
