"""Settling what an apply stored: one process at a time per blueprint, none lost on a crash.

An apply stores the spec (``generation`` N, bumped with a conditional UPDATE so two applies can
never both store "N") and, in the same commit, tries to take the blueprint's settle lease
(``settling_until``, held under a random token in ``settling_by``). Whoever holds the lease
*settles*: ``reconcile`` creates the rollout the new release needs and ``settle`` re-governs
devices and recomputes their desired state (46-53 s over 100,000 devices on the reference box,
so it cannot always ride on the request). Then it records ``settled_generation`` = N and the
rollout it created, and lets go.

Why a lease and a generation rather than a lock or a queue:

- an apply that finds the lease held stores its spec and leaves the work to the holder (a
  background holder looks at ``generation`` again after letting go and takes the lease back
  when it moved), to a waiting request that claims the lease once it is free, or to the
  ticker's sweep; so two processes never reconcile one blueprint at once (two rollouts for one
  release), and no stored spec is left unsettled;
- the holder renews the lease while it works (a thread on its own connection, every third of
  the lease), so a long settle keeps it however long it takes; renewals and the release name
  the holder's token, so a holder that stalled past its lease and lost it cannot clear the
  next holder's. A holder that died (kill -9, a lost host) loses the lease within
  ``settle_lease_seconds``: the ticker's leader then settles every blueprint left behind
  (``settle_behind``). Leases are stamped with the API hosts' clocks: keep them in step (NTP);
- a settle that fails records why (``settle_error``, shown by GET and the CLI), lets go of the
  lease, and is retried by the ticker no sooner than one lease later, so a blueprint that cannot
  be settled costs one attempt a lease, can still be deleted, and holds no other back;
- ``settled_generation`` against ``generation`` is what clients watch, as Kubernetes' observed
  generation: an asynchronous apply (``Prefer: respond-async``) answers 202 at once and the
  caller polls the blueprint until they are equal.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from slmops.server.blueprints.tables import BlueprintRow
from slmops.server.context import Context
from slmops.server.db.base import as_utc, utcnow
from slmops.server.reconcile import reconcile, settle
from slmops.server.rollouts.service import active_rollout

log = logging.getLogger("slmops.server.blueprints")

Contexts = Callable[[], Context]  # a fresh Context per generation: its ``now`` stamps waves


def _lease_free(now: object) -> Any:
    return or_(BlueprintRow.settling_until.is_(None), BlueprintRow.settling_until < now)


def claim(session: Session, name: str, lease_seconds: float) -> str | None:
    """Take the blueprint's settle lease when nobody holds it (or the holder's lapsed); the
    holder's token, None when someone else holds it.

    One conditional UPDATE: on PostgreSQL it waits for a concurrent holder's release or renewal
    and re-checks, so exactly one of two claimants wins. Does not commit: an apply claims in
    the transaction that stores its spec."""
    now, token = utcnow(), secrets.token_hex(8)
    done = session.execute(
        update(BlueprintRow)
        .where(BlueprintRow.name == name, _lease_free(now))
        .values(settling_until=now + timedelta(seconds=lease_seconds), settling_by=token)
        .execution_options(synchronize_session=False)
    )
    return token if getattr(done, "rowcount", 0) == 1 else None


def _held(name: str, token: str) -> Any:
    return (BlueprintRow.name == name) & (BlueprintRow.settling_by == token)


@contextmanager
def _renewed(engine: Engine, name: str, token: str, lease_seconds: float) -> Iterator[None]:
    """Keep the lease while the body runs: a thread extends it every third of the lease on its
    own connection (the settle's session commits on its own schedule). A renewal that fails
    (SQLite busy, a blip) is logged and tried again; two misses in a row still leave a third
    of the lease."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_seconds / 3):
            try:
                with engine.begin() as conn:
                    conn.execute(
                        update(BlueprintRow)
                        .where(_held(name, token))
                        .values(settling_until=utcnow() + timedelta(seconds=lease_seconds))
                    )
            except Exception:
                log.warning("renewing the settle lease of blueprint %s failed", name, exc_info=True)

    thread = threading.Thread(target=renew, name=f"settle-lease-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _release(session: Session, name: str, token: str, **values: Any) -> bool:
    """Let go of the lease ``token`` holds (clearing the token too, so a renewal still in
    flight no longer matches), writing ``values`` with it; whether it was still held. Commits."""
    done = session.execute(
        update(BlueprintRow)
        .where(_held(name, token))
        .values(settling_until=None, settling_by=None, **values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(getattr(done, "rowcount", 0) == 1)


def _created_since(session: Session, row: BlueprintRow) -> str | None:
    """The blueprint's active rollout when it was created after this generation was stored:
    an earlier attempt at this generation created it, then failed (``reconcile`` commits the
    rollout before the devices are settled), so this attempt's ``reconcile`` found it running."""
    active = active_rollout(session, row.name)
    if active is not None and as_utc(active.created_at) >= as_utc(row.updated_at):
        return active.id
    return None


@dataclass(frozen=True)
class _Outcome:
    generation: int
    rollout: str | None = None
    error: Exception | None = None


def _settle_once(
    session: Session, name: str, token: str, *, actor: str, ctx: Context
) -> _Outcome | None:
    """Settle the blueprint's current generation under ``token`` and let go; None when the
    blueprint is gone. A failure is recorded on the row (when the generation it failed on is
    still the current one: a newer spec gets its own attempt) and returned."""
    fresh = select(BlueprintRow).execution_options(populate_existing=True)
    row = session.scalar(fresh.where(BlueprintRow.name == name))
    if row is None:  # deleted meanwhile: nothing left to settle, no lease to let go
        session.commit()
        return None
    generation = row.generation
    if row.settled_generation >= generation:  # settled meanwhile (its waiter, another sweep)
        _release(session, name, token)
        return _Outcome(generation, row.settled_rollout)
    try:
        created = reconcile(session, row, actor=row.applied_by or actor, ctx=ctx)
        created = created or _created_since(session, row)
        settle(session, ctx)
    except Exception as exc:
        session.rollback()
        why = f"{type(exc).__name__}: {exc}"[:500]
        session.execute(
            update(BlueprintRow)
            .where(_held(name, token), BlueprintRow.generation == generation)
            .values(settle_error=why, settle_failed_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        _release(session, name, token)
        return _Outcome(generation, error=exc)
    settled = {"settled_generation": generation, "settled_rollout": created}
    if _release(session, name, token, **settled, settle_error=None, settle_failed_at=None):
        log.info("blueprint %s settled at generation %d", name, generation)
    else:
        log.warning("blueprint %s: the settle lease was lost while settling (stalled?)", name)
    return _Outcome(generation, created)


def settle_claimed(
    session: Session,
    name: str,
    token: str,
    *,
    actor: str,
    contexts: Contexts,
    lease_seconds: float,
    until: int | None = None,
    sessions: sessionmaker[Session] | None = None,
) -> str | None:
    """Settle the blueprint whose lease this process holds (``token``), generation after
    generation until none is left, then let go (see the module docstring). With ``until`` (a
    request waiting for its own apply) and ``sessions``, newer generations left once that one
    is settled go on in a background thread, so the request answers. Returns the rollout the
    last settled generation created (None: none); raises what failed when the generation it
    failed on is the latest (a newer spec is tried instead). Commits."""
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    created: str | None = None
    while True:
        with _renewed(engine, name, token, lease_seconds):
            outcome = _settle_once(session, name, token, actor=actor, ctx=contexts())
        if outcome is None:
            return created
        latest = session.scalar(select(BlueprintRow.generation).where(BlueprintRow.name == name))
        newer = latest is not None and latest > outcome.generation
        if outcome.error is not None and not newer:
            session.commit()
            raise outcome.error
        created = outcome.rollout if outcome.error is None else created
        next_token = claim(session, name, lease_seconds) if newer else None
        session.commit()
        if next_token is None:
            return created
        done = outcome.error is None and until is not None and outcome.generation >= until
        if done and sessions is not None:
            settle_in_background(
                sessions,
                name,
                next_token,
                actor=actor,
                contexts=contexts,
                lease_seconds=lease_seconds,
                wait=0,
            )
            return created
        token = next_token  # a newer spec arrived while settling: take it too


def _settle_logged(
    session: Session,
    name: str,
    token: str,
    *,
    actor: str,
    contexts: Contexts,
    lease_seconds: float,
    until: int | None = None,
    sessions: sessionmaker[Session] | None = None,
) -> None:
    """``settle_claimed`` for callers that report a failure from the row (``settle_error``)
    rather than the exception: it is logged here."""
    try:
        settle_claimed(
            session,
            name,
            token,
            actor=actor,
            contexts=contexts,
            lease_seconds=lease_seconds,
            until=until,
            sessions=sessions,
        )
    except Exception:
        log.exception("settling blueprint %s failed; the ticker retries it", name)


def settle_in_background(
    sessions: sessionmaker[Session],
    name: str,
    token: str,
    *,
    actor: str,
    contexts: Contexts,
    lease_seconds: float,
    wait: float,
) -> bool:
    """Settle the claimed blueprint in a thread of its own (on its own session: the caller's
    request may end first) and wait up to ``wait`` seconds for it. Returns whether it finished
    in time (failed or not: a failure is on the row, ``settle_error``)."""

    def run() -> None:
        with sessions() as session:
            _settle_logged(
                session, name, token, actor=actor, contexts=contexts, lease_seconds=lease_seconds
            )

    thread = threading.Thread(target=run, name=f"settle-{name}", daemon=True)
    thread.start()
    thread.join(wait)
    return not thread.is_alive()


def wait_settled(
    session: Session,
    name: str,
    generation: int,
    *,
    actor: str,
    contexts: Contexts,
    lease_seconds: float,
    timeout: float,
    token: str | None = None,
    sessions: sessionmaker[Session] | None = None,
) -> BlueprintRow | None:
    """Settle ``generation`` here when this process holds the lease (``token``), else wait
    (polling) for whoever holds it, taking the lease and settling here once it is free; the
    row when settled, failed (its ``settle_error``, recorded for its latest generation) or
    ``timeout`` ran out, None when the blueprint is gone."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    fresh = select(BlueprintRow).execution_options(populate_existing=True)
    while True:
        if token is not None:
            _settle_logged(
                session,
                name,
                token,
                actor=actor,
                contexts=contexts,
                lease_seconds=lease_seconds,
                until=generation,
                sessions=sessions,
            )
        row = session.scalar(fresh.where(BlueprintRow.name == name))
        session.commit()
        if row is None or row.settled_generation >= generation or row.settle_error:
            return row
        if time.monotonic() >= deadline:
            return row
        token = claim(session, name, lease_seconds)
        session.commit()
        if token is None:
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def rollout_of(row: BlueprintRow, generation: int) -> str | None:
    """The rollout ``generation`` created, once it is the settled one (None: it created none,
    or a later generation has been settled since)."""
    return row.settled_rollout if row.settled_generation == generation else None


def settling(row: BlueprintRow) -> bool:
    """Whether someone holds the blueprint's lease now, or a generation waits for one (a failed
    settle waits for the ticker's retry: not settling, ``settle_error`` says why)."""
    held = row.settling_until is not None and as_utc(row.settling_until) > utcnow()
    return held or (row.settled_generation < row.generation and not row.settle_error)


def settle_behind(
    session: Session,
    sessions: sessionmaker[Session],
    contexts: Contexts,
    *,
    lease_seconds: float,
    wait: float = 0.0,
) -> list[str]:
    """The ticker's sweep: settle every blueprint whose settled generation is behind and whose
    lease is free (its holder died, or let go just before a newer apply was stored); one whose
    last settle failed is retried a lease after the failure. Each settles in a thread of its
    own (``settle_in_background``, waited for up to ``wait`` seconds), so a minute-long settle
    of a big fleet does not hold the ticker's other work. Returns the names it took."""
    now = utcnow()
    retry = now - timedelta(seconds=lease_seconds)
    behind = list(
        session.scalars(
            select(BlueprintRow.name)
            .where(BlueprintRow.settled_generation < BlueprintRow.generation)
            .where(_lease_free(now))
            .where(
                or_(BlueprintRow.settle_failed_at.is_(None), BlueprintRow.settle_failed_at < retry)
            )
            .order_by(BlueprintRow.name)
        )
    )
    session.commit()
    taken = []
    for name in behind:
        token = claim(session, name, lease_seconds)
        session.commit()
        if token is None:
            continue
        log.warning("blueprint %s was left unsettled: settling it now", name)
        settle_in_background(
            sessions,
            name,
            token,
            actor="ticker",
            contexts=contexts,
            lease_seconds=lease_seconds,
            wait=wait,
        )
        taken.append(name)
    return taken
