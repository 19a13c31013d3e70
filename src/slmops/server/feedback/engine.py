"""Matching new alerts against the applied rules and acting on them.

Runs from the periodic loop of every API process. Each (alert, rule, action) is claimed by
inserting its ``alert_actions`` row first (unique key), so with several processes every action
still happens once; an alert no rule matches gets one ``none`` row so it is not looked at again.
Actions: ``pause`` running rollouts of the alert's version, ``notify`` a webhook (a POST with the
alert and the rule, sent by the webhook worker within its time budget to allowed targets only,
the outcome recorded: ``webhooks.py``), ``improve`` (queue an improvement job for
the version and profile, with the variant the profile's devices run and the blueprint governing
them; a worker runs it, see ``api.py``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from slmops.server.context import Context
from slmops.server.db.models import Device
from slmops.server.desired import governing
from slmops.server.feedback import webhooks
from slmops.server.feedback.rules import Action, FeedbackRules, matches
from slmops.server.feedback.tables import AlertAction, FeedbackRulesRow, ImprovementJob
from slmops.server.registry.tables import RegistryTag
from slmops.server.rollouts.machine import InvalidTransition, OperatorAction, OperatorCommand
from slmops.server.rollouts.service import run_event
from slmops.server.rollouts.tables import Rollout
from slmops.server.targets import load_blueprints
from slmops.server.telemetry.tables import AlertRow

log = logging.getLogger("slmops.server.feedback")
BATCH = 100


def alert_doc(alert: AlertRow) -> dict[str, Any]:
    return {
        "id": alert.id,
        "kind": alert.kind,
        "model": alert.model,
        "version": alert.version,
        "profile": alert.profile,
        "statistic": alert.statistic,
        "value": alert.value,
        "threshold": alert.threshold,
        "details": alert.details,
    }


def load_rules(session: Session) -> list[tuple[str, FeedbackRules]]:
    out = []
    for row in session.scalars(select(FeedbackRulesRow).order_by(FeedbackRulesRow.name)):
        doc = {"apiVersion": "slmops/v1", "kind": "FeedbackRules", "metadata": {"name": row.name}}
        out.append((row.name, FeedbackRules.model_validate(doc | {"spec": row.spec})))
    return out


def process_alerts(session: Session, ctx: Context) -> int:
    """Act on alerts not handled yet; returns how many actions were taken. Commits."""
    done = select(AlertAction.alert_id)
    alerts = list(
        session.scalars(
            select(AlertRow).where(AlertRow.id.not_in(done)).order_by(AlertRow.id).limit(BATCH)
        )
    )
    if not alerts:
        return 0
    rule_sets = load_rules(session)
    taken = 0
    for alert in alerts:
        doc = alert_doc(alert)
        matched = False
        for set_name, rules in rule_sets:
            for rule in rules.spec.rules:
                if not matches(rule.match, doc):
                    continue
                matched = True
                for i, action in enumerate(rule.actions):
                    taken += _act(session, alert, f"{set_name}/{rule.name}", i, action, ctx)
        if not matched:
            _claim(session, alert.id, "", 0, "none", "no rule matches")
            session.commit()
    return taken


def _claim(
    session: Session, alert_id: int, rule: str, index: int, action: str, detail: str
) -> AlertAction | None:
    row = AlertAction(
        alert_id=alert_id, rule=rule, action_index=index, action=action, detail=detail
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # another process took it
        session.rollback()
        return None
    return row


def _act(
    session: Session, alert: AlertRow, rule: str, index: int, action: Action, ctx: Context
) -> int:
    row = _claim(session, alert.id, rule, index, action.kind, "")
    if row is None:
        return 0
    why = (
        f"alert {alert.id}: {alert.kind} {alert.statistic} {alert.value:.3g} "
        f"(threshold {alert.threshold:g}) on {alert.model}:{alert.version} {alert.profile}"
    )
    try:
        if action.pause is not None:
            row.detail = _pause(session, alert, rule, action.pause.reason or why, ctx)
        elif action.notify is not None:
            # the claim is committed before the webhook worker (webhooks.py) sends it and
            # records the outcome on this row; the ticker never waits on a remote server
            row.ok, row.detail = False, f"webhook {action.notify.url}: sending"
            session.commit()
            body = {"source": "slmops", "rule": rule, "alert": alert_doc(alert)}
            bind = session.get_bind()
            engine = bind if isinstance(bind, Engine) else bind.engine
            hook = webhooks.Job(
                engine, row.id, action.notify.url, action.notify.timeout_seconds, body
            )
            if not webhooks.enqueue(hook):
                row.ok, row.detail = False, f"webhook {action.notify.url}: queue full, not sent"
        elif action.improve is not None:
            job = _improve(session, alert, rule, action.improve.direction, action.improve.start)
            if isinstance(job, str):
                row.ok, row.detail = False, job
            else:
                row.job_id, row.detail = job.id, f"improvement job {job.id} queued"
    except Exception as exc:  # one failing action must not stop the loop
        session.rollback()
        log.exception("feedback action %s for alert %s failed", action.kind, alert.id)
        # the claim may be committed already (pause's run_event and notify commit): update it
        # then, as adding it again would break its unique key and the whole batch with it
        found = session.scalar(
            select(AlertAction).where(
                AlertAction.alert_id == alert.id,
                AlertAction.rule == rule,
                AlertAction.action_index == index,
            )
        )
        if found is None:
            found = AlertAction(
                alert_id=alert.id, rule=rule, action_index=index, action=action.kind
            )
            session.add(found)
        found.ok, found.detail = False, f"{type(exc).__name__}: {exc}"[:2000]
        row = found
    session.commit()
    log.info("alert %s: %s %s: %s", alert.id, rule, action.kind, row.detail)
    return 1


def _pause(session: Session, alert: AlertRow, rule: str, reason: str, ctx: Context) -> str:
    rows = session.scalars(
        select(Rollout).where(
            Rollout.model == alert.model,
            Rollout.target_version == alert.version,
            Rollout.status == "running",
        )
    ).all()
    paused = []
    for r in rows:
        command = OperatorCommand(action=OperatorAction.PAUSE, actor=f"rule:{rule}", reason=reason)
        try:
            run_event(session, r.id, command, ctx)
            paused.append(r.id)
        except InvalidTransition:
            continue
    return f"paused {', '.join(paused)}" if paused else f"no running rollout of {alert.version}"


def _improve(
    session: Session, alert: AlertRow, rule: str, direction: str, start: str
) -> ImprovementJob | str:
    """Queue a job; the variant and blueprint come from the devices of that profile running
    that version (the most common), since the alert names only version and profile."""
    blueprints = load_blueprints(session)
    variants: Counter[str] = Counter()
    governed: Counter[str] = Counter()
    for device in session.scalars(select(Device).where(Device.profile == alert.profile)):
        active = device.active or {}
        if (active.get("name"), active.get("version")) != (alert.model, alert.version):
            continue
        variants[str(active.get("variant"))] += 1
        bp = governing(blueprints, device.effective_labels)
        if bp is not None:
            governed[bp.metadata.name] += 1
    if not variants:
        return f"no {alert.profile} device runs {alert.model}:{alert.version}"
    if not governed:
        return f"no blueprint governs the {alert.profile} devices running {alert.version}"
    job = ImprovementJob(
        alert_id=alert.id,
        rule=rule,
        blueprint=governed.most_common(1)[0][0],
        model=alert.model,
        version=alert.version,
        variant=variants.most_common(1)[0][0],
        profile=alert.profile,
        direction=direction,
        start=start,
    )
    session.add(job)
    session.flush()
    return job


def next_version(session: Session, model: str, version: str) -> str:
    """The next patch version after ``version`` (1.2.3 -> 1.2.4, ...) that is neither in the
    registry nor promised to a running job."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"version {version!r} is not semantic versioning")
    major, minor, patch = (int(x) for x in m.groups())
    taken = set(session.scalars(select(RegistryTag.tag).where(RegistryTag.repository == model)))
    # versions promised to jobs still running: two workers must not push the same version
    taken |= set(
        session.scalars(
            select(ImprovementJob.new_version).where(
                ImprovementJob.model == model, ImprovementJob.status == "running"
            )
        )
    )
    while True:
        patch += 1
        candidate = f"{major}.{minor}.{patch}"
        if candidate not in taken:
            return candidate
