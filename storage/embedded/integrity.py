"""Finding damaged segment files: missing, truncated, grown, altered or unreadable.

Every segment file's size and BLAKE2b digest are recorded in the catalog when it is
written (commit, compaction, pack, repair). A *quick* check compares sizes (one
``stat`` per file: cheap enough for every store opening and every watcher cycle); a
*full* check also re-reads each file and compares its digest (``tally verify``, the
watcher now and then), which is what finds a flipped bit. A file written before
digests existed is checked by reading its Parquet footer.

What is found is recorded in the catalog's ``damage`` table, under the write lock,
and the generation is bumped so that readers stop reading those partitions at once;
a record goes when no live segment refers to its file any more (a repair replaced
it). The file itself is left where it is, for an operator to look at.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.embedded.catalog import Catalog, FileRecord
from storage.embedded.segments import file_digest
from storage.protocol import Damage

log = logging.getLogger(__name__)


def examine(record: FileRecord, *, full: bool) -> str | None:
    """Why ``record``'s file is damaged, or None. Reasons never name the path (they
    reach clients): the catalog knows which file it is."""
    path = Path(record.path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file missing"
    except OSError as exc:
        return f"file cannot be read ({exc.strerror or type(exc).__name__})"
    if record.file_bytes is not None and size != record.file_bytes:
        return f"file is {size} bytes, {record.file_bytes} were written"
    if not full:
        return None
    try:
        if record.digest is not None:
            return None if file_digest(path) == record.digest else "file content altered"
        pq.read_metadata(path)  # no digest recorded: at least its footer must read
    except (OSError, pa.ArrowException) as exc:
        return f"file cannot be read ({type(exc).__name__})"
    return None


def check_files(
    catalog: Catalog,
    *,
    full: bool,
    found_by: str,
    datasources: Sequence[str] | None = None,
) -> list[Damage]:
    """Examine the live segment files (of ``datasources``, or all), record what is
    damaged, and return every damaged live segment the catalog knows of."""
    with catalog.read():
        records = catalog.file_records()
        recorded = catalog.damage()
    wanted = None if datasources is None else set(datasources)
    found = [
        (r.path, why)
        for r in records
        if wanted is None or r.datasource in wanted
        if (why := examine(r, full=full)) is not None
    ]
    if not found and not recorded:
        return []  # nothing to record nor to forget: no write lock taken
    with catalog.write():
        new = catalog.record_damage(found, found_by) if found else 0
        catalog.forget_damage()
        if new:
            catalog.bump_generation()  # readers leave the damaged partitions out now
        damage = catalog.damage()
    for d in damage:
        if any(d.path == path for path, _why in found) and new:
            log.error(
                "%s partition %s is damaged: %s (%s); rebuild it with tally verify --repair",
                d.datasource,
                d.partition,
                d.reason,
                d.path,
            )
    return damage
