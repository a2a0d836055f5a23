"""The data directory is private: 0700 for the directory, 0600 for every file in it, whatever
the process umask, and a directory written by an older version is tightened on start."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtor_p2p.compute.receipt_store import ReceiptStore
from mtor_p2p.config import (
    NodeConfig,
    private_dir,
    private_sqlite,
    secure_data_dir,
    write_private,
)
from mtor_p2p.identity import KEY_FILE_NAME, IdentityError, load_or_create_identity
from mtor_p2p.ledger.store import LEDGER_FILE_NAME, Ledger
from mtor_p2p.node import Node
from tests.ledger_data import PEERS, genesis, receipt


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Run the test under the common permissive umask (files 0644, directories 0755)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    """Permission bits of ``path`` (not following a link)."""
    return stat.S_IMODE(path.lstat().st_mode)


def modes(data_dir: Path) -> dict[str, int]:
    """Every file in ``data_dir`` (recursively) and its mode, the directory itself as ``.``."""
    found = {".": mode(data_dir)}
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root, name)
            found[str(path.relative_to(data_dir))] = mode(path)
    return found


def assert_private(data_dir: Path) -> None:
    """The directory is 0700 and everything in it 0600 (subdirectories 0700)."""
    wrong = {
        name: oct(m)
        for name, m in modes(data_dir).items()
        if m != (0o700 if (data_dir / name).is_dir() else 0o600)
    }
    assert not wrong, wrong


def test_identity_and_stores_are_private_under_a_permissive_umask(
    tmp_path: Path, umask_022: None
) -> None:
    """A fresh data directory, the key, the ledger and receipt stores with their WAL and
    shared-memory files, and files written with write_private: 0700 and 0600."""
    data_dir = tmp_path / "node"
    load_or_create_identity(data_dir)
    ledger = Ledger(data_dir / LEDGER_FILE_NAME, genesis())
    receipts = ReceiptStore(data_dir / "receipts.sqlite")
    try:
        ledger.ingest([receipt(PEERS[0], PEERS[1], shard=0, price=0.01)])
        write_private(data_dir / "cache.json", "{}")
        names = set(modes(data_dir))
        for store in (LEDGER_FILE_NAME, "receipts.sqlite"):
            # SQLite made its side files while the stores were open: they are covered too.
            assert {store, f"{store}-wal", f"{store}-shm"} <= names
        assert KEY_FILE_NAME in names and "cache.json" in names
        assert_private(data_dir)
    finally:
        ledger.close()
        receipts.close()
    assert_private(data_dir)


def test_a_data_directory_from_an_older_version_is_tightened_on_start(
    tmp_path: Path, umask_022: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A 0755 directory with 0644 files (ledger and its WAL, genesis copy, caches) becomes
    0700 with 0600 files when a command starts, with a log line saying so; a readable key is
    still refused rather than silently tightened (it may have leaked)."""
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    for name in ("genesis.json", "tflops.json", LEDGER_FILE_NAME, f"{LEDGER_FILE_NAME}-wal"):
        (data_dir / name).write_text("x")
        os.chmod(data_dir / name, 0o644)
    with caplog.at_level(logging.WARNING, logger="mtor_p2p.config"):
        load_or_create_identity(data_dir)
    assert_private(data_dir)
    assert "tightened to 700" in caplog.text and "genesis.json" in caplog.text

    os.chmod(data_dir / KEY_FILE_NAME, 0o644)
    with pytest.raises(IdentityError, match="readable by other users"):
        load_or_create_identity(data_dir)
    assert mode(data_dir / KEY_FILE_NAME) == 0o644


def test_sqlite_side_files_left_readable_are_tightened_when_the_store_opens(
    tmp_path: Path, umask_022: None
) -> None:
    """A store opened on files an older version left 0644 (database, WAL, SHM) makes all of
    them 0600 before SQLite touches them."""
    path = tmp_path / "receipts.sqlite"
    ReceiptStore(path).close()
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        (tmp_path / name).touch()
        os.chmod(tmp_path / name, 0o644)
    private_sqlite(path)
    private_sqlite(":memory:")  # nothing to do, no file called ":memory:"
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        path.name: 0o600,
        f"{path.name}-wal": 0o600,
        f"{path.name}-shm": 0o600,
    }


def test_a_shared_sticky_directory_is_not_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--data-dir /tmp`` must not chmod /tmp: a sticky directory is left as it is, with a
    warning."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with caplog.at_level(logging.WARNING, logger="mtor_p2p.config"):
        private_dir(shared)
        secure_data_dir(shared)
    assert mode(shared) == 0o1777
    assert "shared" in caplog.text


async def test_a_running_node_keeps_its_data_directory_private(
    tmp_path: Path, umask_022: None
) -> None:
    """A real node (py-libp2p host, SQLite stores, genesis copy, TFLOP/s cache, control API
    files) started in a fresh directory under umask 022: 0700 and 0600 while it runs and
    after it stops."""
    data_dir = tmp_path / "node"
    config = NodeConfig(
        data_dir=data_dir,
        listen=["/ip4/127.0.0.1/tcp/0"],
        gpu="none",
        use_default_bootstrap=False,
    )
    async with Node.open(config):
        assert_private(data_dir)
    assert_private(data_dir)
