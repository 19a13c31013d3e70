"""The one digest shape that crosses the wire: ``sha256:`` and 64 lowercase hex digits.

A digest from a control plane or a bundle becomes a file name on a device (staging folders,
blob files), so ``sha256:../..`` or ``sha256:/abs`` must never get past parsing. Every protocol
field that holds a digest is typed ``Digest``, so the server refuses a bad one on the way in and
the agent on the way out, with one pattern (``\\Z``, not ``$``: ``$`` also matches before a
trailing newline).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}\Z"
DIGEST_RE = re.compile(DIGEST_PATTERN)


def is_digest(value: object) -> bool:
    """True for a well-formed ``sha256:<64 hex>`` string."""
    return isinstance(value, str) and DIGEST_RE.match(value) is not None


def _check(value: str) -> str:
    if not DIGEST_RE.match(value):
        raise ValueError(
            f"malformed digest {value[:80]!r}: expected 'sha256:' and 64 lowercase hex digits"
        )
    return value


Digest = Annotated[
    str,
    AfterValidator(_check),
    # JSON Schema has no \Z; `$` there means end of string (ECMA-262 without the m flag)
    WithJsonSchema({"type": "string", "pattern": r"^sha256:[0-9a-f]{64}$"}),
]
