"""Trust for the audit log from outside the MLflow store: entries signed with a key the store's
writers do not hold, and every head written to an anchor the store does not hold.

Anyone with write access to the registry (MLflow's API is enough) can soft-delete a model's audit
run, make a new one and re-log every entry with a recomputed chain: the hash chain alone cannot
see that. So each entry carries an Ed25519 signature over its canonical text, made with a key
kept outside the store (`registry.audit_key`, default `<state>/secrets/audit-signing.key`, mode
0600), and after each append the model's sequence number and head hash are appended to an anchor
file (`registry.audit_anchor`, default `<state>/audit-anchor.log`; point it at another volume,
ideally append-only). `verify` checks every signature against the key's public half and that
the log ends exactly at the last anchored head. `Anchor` is the interface an object-lock bucket
or a transparency-log service would implement.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cluster.core.config import RegistrySettings
from cluster.core.secrets import secret_file
from cluster.core.state import StateDir

KEY_FILE = Path("secrets") / "audit-signing.key"
ANCHOR_FILE = "audit-anchor.log"


class Anchor(Protocol):
    def record(self, model: str, seq: int, sha256: str) -> None: ...

    def latest(self, model: str) -> tuple[int, str] | None: ...


@dataclass(frozen=True)
class AnchorFile:
    """Append-only lines `<model> <seq> <sha256>`, each synced before the append returns."""

    path: Path

    def record(self, model: str, seq: int, sha256: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{model} {seq} {sha256}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def latest(self, model: str) -> tuple[int, str] | None:
        if not self.path.is_file():
            return None
        found = None  # the highest: writers on several hosts may anchor out of order
        for line in self.path.read_text().splitlines():
            parts = line.split(" ")
            mine = len(parts) == 3 and parts[0] == model and parts[1].isdigit()
            if mine and (found is None or int(parts[1]) >= found[0]):
                found = (int(parts[1]), parts[2])
        return found


@dataclass(frozen=True)
class AuditTrust:
    """The signing key and the anchor of a deployment's audit logs."""

    key: Ed25519PrivateKey
    anchor: Anchor

    @classmethod
    def from_settings(cls, settings: RegistrySettings, state: StateDir) -> AuditTrust:
        key_path = Path(settings.audit_key) if settings.audit_key else state.root / KEY_FILE
        anchor = Path(settings.audit_anchor) if settings.audit_anchor else state.root / ANCHOR_FILE
        return cls(load_or_make_key(key_path), AnchorFile(anchor))

    @property
    def key_id(self) -> str:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return hashlib.sha256(raw).hexdigest()[:16]

    def sign(self, text: str) -> str:
        return base64.b64encode(self.key.sign(text.encode())).decode()

    def verifies(self, text: str, signature: str) -> bool:
        public: Ed25519PublicKey = self.key.public_key()
        try:
            public.verify(base64.b64decode(signature, validate=True), text.encode())
        except (InvalidSignature, ValueError):
            return False
        return True


def load_or_make_key(path: Path) -> Ed25519PrivateKey:
    """The PEM key at `path`, made if absent (cluster.core.secrets)."""

    def make() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    key = serialization.load_pem_private_key(secret_file(path, make), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key
