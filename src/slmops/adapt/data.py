"""A site's training data: plain text or JSONL chat examples, split into train and held-out.

Plain text is cut into paragraphs (blank lines; single lines when there are none); JSONL holds
one `{"messages": [{"role": ..., "content": ...}, ...]}` per line, rendered with the tokenizer's
chat template when it has one (so the adapter learns the format the runtime will feed it), else
as `role: content` lines. Every tenth unit goes to the held-out split, interleaved rather than
the file's tail, so the held-out perplexity measures the same mix of topics the adapter saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.core.errors import ConfigError

HOLDOUT_EVERY = 10
MIN_CHARS = 200


@dataclass
class SiteData:
    path: Path
    kind: str  # "text" or "chat"
    train: list[str]
    heldout: list[str]
    chat_template: bool

    def describe(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "kind": self.kind,
            "train_units": len(self.train),
            "heldout_units": len(self.heldout),
            "train_chars": sum(map(len, self.train)),
            "heldout_chars": sum(map(len, self.heldout)),
            "chat_template": self.chat_template,
        }


def read_data(path: Path) -> str:
    """The file's text, refused early (before any model loads) when missing or empty."""
    if not path.exists():
        raise ConfigError(
            "data file not found", where=path, hint="pass a UTF-8 text file or a JSONL file"
        )
    if not path.is_file():
        raise ConfigError("data is not a file", where=path, hint="pass a text or JSONL file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read data: {exc}", where=path, hint="save it as UTF-8") from None
    if not raw.strip():
        raise ConfigError("data file is empty", where=path, hint="give the site's text or examples")
    return raw


def load_site_data(path: Path, tokenizer: Any, raw: str | None = None) -> SiteData:
    """Read, validate and split; every problem names the file (and line) and how to fix it."""
    raw = read_data(path) if raw is None else raw
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or raw.lstrip().startswith("{")
    template = bool(getattr(tokenizer, "chat_template", None))
    units = _chat_units(path, raw, tokenizer, template) if is_jsonl else _text_units(raw)
    total = sum(map(len, units))
    if total < MIN_CHARS or len(units) < 2:
        raise ConfigError(
            f"data too small: {len(units)} unit(s), {total} characters",
            where=path,
            hint=f"give at least 2 paragraphs or examples and {MIN_CHARS} characters; "
            "a few hundred examples are typical",
        )
    held = [u for i, u in enumerate(units) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    train = [u for i, u in enumerate(units) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    if not held:  # fewer than ten units: hold out the last one
        held, train = units[-1:], units[:-1]
    return SiteData(path, "chat" if is_jsonl else "text", train, held, template and is_jsonl)


def _text_units(raw: str) -> list[str]:
    paras = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if len(paras) < 2:
        paras = [line.strip() for line in raw.splitlines() if line.strip()]
    return paras


def _chat_units(path: Path, raw: str, tokenizer: Any, template: bool) -> list[str]:
    units = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"not valid JSON: {exc.msg}",
                where=where,
                hint='one JSON object per line: {"messages": [{"role": "user", "content": "..."}]}',
            ) from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise ConfigError(
                "expected a non-empty `messages` list of {role, content} strings",
                where=where,
                hint='write {"messages": [{"role": "user", "content": "..."}, '
                '{"role": "assistant", "content": "..."}]}',
            )
        if template:
            units.append(str(tokenizer.apply_chat_template(msgs, tokenize=False)))
        else:
            units.append("\n".join(f"{m['role']}: {m['content']}" for m in msgs))
    return units
