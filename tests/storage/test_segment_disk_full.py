"""A full disk under the segment files is terminal, not a retry for ever.

The segments directory is a real, tiny tmpfs (mounted for the test: root only), so
the Parquet write fails with the kernel's own ENOSPC; the catalog stays elsewhere.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import open_store
from tally.errors import StoreFull
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.factories import payment


@pytest.fixture
def small_disk(settings: Settings) -> Iterator[Path]:
    root = settings.segments_dir
    root.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(root)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_full_disk_stops_the_commit_with_a_terminal_one_line_error(
    small_disk: Path, settings: Settings, registry: SpecRegistry
) -> None:
    store = open_store(settings, registry)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # the disk is full now
    finally:
        os.close(fd)
    rows = [payment(f"k{i}", order_name="x" * 200) for i in range(2_000)]
    with pytest.raises(StoreFull) as caught:
        store.commit("payments", rows)
    assert not caught.value.transient
    assert "disk is full" in caught.value.message and "\n" not in caught.value.message
    assert store.stored_offsets("payments") == {}
    assert not list(small_disk.rglob("*.parquet"))  # nothing half-written is left
    filler.unlink()
    assert store.commit("payments", rows).rows_written == 2_000
    store.close()
