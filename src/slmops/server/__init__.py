"""Control plane: device and operator APIs, database, registry, rollouts, telemetry, dashboard."""
