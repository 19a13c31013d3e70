"""Rollouts: moving a blueprint's devices to a new release in waves, one package per concern.

- ``machine/``: the pure state machine (waves, gates, policy, events). It imports no database,
  HTTP or clock; the import-linter contract "the rollout state machine is pure" checks that.
- ``tables.py``: the ``rollouts`` and ``rollout_devices`` tables.
- ``store.py``: loading a machine state from the rollout row and its ``rollout_devices`` rows
  and writing back only what a step changed.
- ``service.py``: the I/O around the machine: ``run_event`` (optimistic, retried steps),
  carrying out its commands, ``tick_all`` for the ticker.
- ``routes.py``: ``/api/v1/rollouts``, operators listing, reading and steering rollouts.

This file imports nothing, so importing the pure ``machine`` package loads no database code.
"""
