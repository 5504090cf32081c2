"""Keyed identities of training examples and datasets: privacy accounting by content, not name.

Composition across versions must know which examples two runs share, whatever the file, split
or share is called. A plain hash of an example would tell that too, to anyone: hash a candidate
example, look it up, and membership is certain (what differential privacy exists to prevent).
So every identity fedforge records is an HMAC-SHA256 under the deployment's example key, a
random 32-byte secret kept in the state directory (`<state>/secrets/example-ids.key`, mode
0600) that never leaves it. Without the key an identity is indistinguishable from random; with
it, the operator recomputes and matches them. Records made under another key cannot be matched:
readers then assume the worst (every example shared), never the best.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cluster.core.digest import tree_sha256
from cluster.core.secrets import secret_file
from cluster.core.state import StateDir

KEY_FILE = Path("secrets") / "example-ids.key"
ID_HEX = 32  # 128 bits: no collision among any realistic number of examples


@dataclass(frozen=True)
class ExampleKey:
    secret: bytes

    @classmethod
    def of(cls, state: StateDir) -> ExampleKey:
        """The state dir's key, made on first use (atomically: concurrent jobs get one key)."""
        return cls(secret_file(state.root / KEY_FILE, lambda: secrets.token_bytes(32)))

    @property
    def key_id(self) -> str:
        """Names the key in records (so records under another key are recognised as such)."""
        return hashlib.sha256(b"fedforge example key\0" + self.secret).hexdigest()[:16]

    def example_id(self, content: str) -> str:
        return hmac.new(self.secret, content.encode(), hashlib.sha256).hexdigest()[:ID_HEX]

    def example_ids(self, contents: Iterable[str]) -> list[str]:
        """Sorted, so the list says nothing about file order."""
        return sorted({self.example_id(c) for c in contents})

    def file_digest(self, path: str | Path) -> str:
        """HMAC-SHA256 of a data file (or every file of a directory, as cluster.core.digest)."""
        return hmac.new(self.secret, tree_sha256(path).encode(), hashlib.sha256).hexdigest()
