"""Secrets: generation, hashing, and the operator roles.

Every secret the server hands out (operator API tokens, enrollment tokens, device
credentials) is 32 random bytes from ``secrets`` (256 bits), prefixed with its kind so a
leaked string is recognisable and a secret of one kind can never authenticate as another.

Why one SHA-256 and not scrypt/argon2: slow, salted hashes exist to protect *low-entropy*
secrets (passwords) against guessing once the hash table leaks. A 256-bit random token cannot
be guessed, with or without a salt, so a slow hash buys nothing and would cost CPU on every
authenticated request (devices check in constantly). An unsalted digest also lets the server
find the row by an indexed equality lookup on the hash, without a second identifier in the
token and without any per-process cache, which keeps API processes stateless. The digest is
domain-separated by kind, so a hash from one table is useless in another.
"""

from __future__ import annotations

import hashlib
import secrets
from enum import StrEnum


class TokenKind(StrEnum):
    """What a secret is for; the value is its visible prefix."""

    API = "slmo"  # operator API token
    ENROLLMENT = "slme"  # enrollment token (reusable, expiring)
    DEVICE = "slmd"  # per-device credential


class Role(StrEnum):
    """Operator roles, each including the rights of the ones before it."""

    VIEWER = "viewer"  # read only
    OPERATOR = "operator"  # + devices, labels, enrollment tokens
    ADMIN = "admin"  # + API tokens

    def allows(self, needed: Role) -> bool:
        """True when this role has at least the rights of ``needed``."""
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def new_secret(kind: TokenKind) -> str:
    """A fresh secret of ``kind``: ``<prefix>_<43 url-safe characters>``."""
    return f"{kind.value}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str, kind: TokenKind) -> str:
    """The hex digest stored in the database for ``secret`` (see the module docstring)."""
    return hashlib.sha256(f"slmops:{kind.value}:{secret}".encode()).hexdigest()


def looks_like(secret: str, kind: TokenKind) -> bool:
    """Cheap shape check before touching the database."""
    return secret.startswith(kind.value + "_") and 16 <= len(secret) <= 256


def new_id(prefix: str) -> str:
    """A short random public identifier (not a secret), e.g. ``tok_3f9a1c2b7d4e``."""
    return f"{prefix}_{secrets.token_hex(6)}"
