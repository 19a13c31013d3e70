"""Signed, versioned model bundles as OCI image layouts (and tarballs), and registry transfer.

Verification code here is imported by the edge agent: standard library, pydantic and
cryptography only.
"""
