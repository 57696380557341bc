"""A key index saved to disk, so a writer starts by loading it instead of rebuilding it.

Rebuilding reads every live segment (100M keys: minutes); loading reads one file of
the index's own arrays (seconds). The snapshot stays *derived*: it names the catalog
it was taken from (its random identity), the catalog seq it reflects and the repair
count it was built under. A writer loads it only if all three still hold (same
catalog, seq not ahead of the catalog's, no repair since), then catches up with the
segments committed after that seq exactly as a running writer does; anything else —
a missing, torn, foreign or stale file — is a rebuild from the segments. The file is
written to a temporary name, synced and renamed over the old one, so a crash leaves
the old snapshot or the new, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from storage.embedded.keycodes import Codes
from storage.embedded.keyindex import KeyIndex
from tally.specs import DatasourceSpec

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the arrays or the fingerprint change meaning
_MANIFEST = "manifest"


def _path(directory: Path, datasource: str) -> Path:
    return directory / f"{datasource}.npz"


def _layout(index: KeyIndex) -> list[list[Any]]:
    return [[c.name, c.kind, c.nullable] for c in index.state]


def save(directory: Path, index: KeyIndex, identity: int) -> None:
    """Write ``index`` (merged into one run first) as of its seq."""
    index.compact()
    manifest = {
        "format": FORMAT,
        "datasource": index.spec.name,
        "layout": _layout(index),
        "identity": identity,
        "seq": index.seq,
        "repairs": index.repairs,
        "count": len(index),
        "codes": {name: book.values for name, book in index.codes.items()},
    }
    arrays = index.runs[0] if index.runs else {}
    directory.mkdir(parents=True, exist_ok=True)
    target = _path(directory, index.spec.name)
    temporary = target.with_suffix(f".tmp-{os.getpid()}")
    try:
        with temporary.open("wb") as out:
            members = {_MANIFEST: np.array(json.dumps(manifest)), **arrays}
            np.savez(out, **members)  # type: ignore[arg-type]
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def load(
    directory: Path, spec: DatasourceSpec, identity: int, repairs: int, seq: int
) -> KeyIndex | None:
    """The saved index if it still describes this catalog, else None (rebuild)."""
    path = _path(directory, spec.name)
    if not path.exists():
        return None
    index = KeyIndex(spec)
    try:
        with np.load(path, allow_pickle=False) as saved:
            manifest = json.loads(str(saved[_MANIFEST]))
            why = _refusal(manifest, index, identity, repairs, seq)
            if why is not None:
                log.info("key index snapshot %s not used: %s", path, why)
                return None
            names = [n for n in saved.files if n != _MANIFEST]
            run = {name: saved[name] for name in names}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("key index snapshot %s unreadable, rebuilding: %s", path, exc)
        return None
    if any(len(a) != manifest["count"] for a in run.values()):
        log.warning("key index snapshot %s is inconsistent, rebuilding", path)
        return None
    index.runs = [run] if manifest["count"] else []
    index.codes = {
        name: Codes(values, {v: i for i, v in enumerate(values) if i})
        for name, values in manifest["codes"].items()
    }
    index.seq = int(manifest["seq"])
    index.repairs = repairs
    return index


def _refusal(
    manifest: dict[str, Any], index: KeyIndex, identity: int, repairs: int, seq: int
) -> str | None:
    if manifest.get("format") != FORMAT or manifest.get("layout") != _layout(index):
        return "another format or state layout"
    if manifest.get("identity") != identity:
        return "taken from another catalog"
    if manifest.get("repairs") != repairs:
        return "a repair rewrote rows since"
    if int(manifest.get("seq", seq + 1)) > seq:
        return "ahead of the catalog"
    return None
