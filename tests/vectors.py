"""Access to the shared SDK test vectors at ../shared/vectors (never copied here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"
ABSENT_REASON = f"SDK test vectors not found at {VECTORS} (only present beside the project)"


def require_vectors() -> Path:
    """The vectors folder, or skip the calling test with a clear reason."""
    if not (VECTORS / "index.json").is_file():
        pytest.skip(ABSENT_REASON)
    return VECTORS


@dataclass(frozen=True)
class Vector:
    name: str
    data: dict[str, Any]

    @property
    def outcome(self) -> str:
        return str(self.data["expected_outcome"])

    def keys(self) -> list[bytes]:
        from fp_core.keys import decode_base64_lenient

        return [decode_base64_lenient(k) for k in self.data["keys_b64"]]

    def expected_json(self) -> list[Any]:
        """Every reference JSON the vector names: the SDK's expected file and plaintext."""
        found = []
        path = self.data.get("expected_json_path_or_inline")
        if isinstance(path, str) and path.endswith(".json"):
            found.append(json.loads((VECTORS / path).read_text()))
        plaintext = (self.data.get("verification") or {}).get("plaintext_path")
        if plaintext:
            found.append(json.loads((VECTORS / plaintext).read_text()))
        return found


def vector_files() -> list[Path]:
    if not (VECTORS / "index.json").is_file():
        return []
    files = sorted(VECTORS.glob("*.json")) + sorted((VECTORS / "synthetic").glob("*.json"))
    return [f for f in files if f.name not in ("index.json", "unique_payloads.json")]


def load_vector(path: Path) -> Vector:
    return Vector(path.relative_to(VECTORS).as_posix(), json.loads(path.read_text()))


def event_examples() -> list[Path]:
    """Examples shaped like a sealed event: not the search result, and not the v3 webhook,
    whose flat body is not what a v3 sealed result holds."""
    folder = VECTORS / "events"
    if not folder.is_dir():
        return []
    skip = ("v4_search_events_200.json", "v3_webhook_flat_bot_bad.json")
    return sorted(p for p in folder.glob("*.json") if p.name not in skip)
