"""``mtor-peer balance``, ``stake`` and ``ledger verify`` on the README's devnet, as real
subprocesses: every peer ends up with the same balances, and the supply is conserved."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

from mtor_p2p.control_client import ControlClient
from tests.processes import mtor, read_json_line, start


def accounts(data_dir: str) -> dict:
    result = mtor("balance", "--all", "--json", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_balances_agree_on_every_peer_and_the_supply_is_conserved(tmp_path):
    devnet = start("devnet", "--peers", "4", "--json", "--dir", str(tmp_path / "net"))
    try:
        peers = read_json_line(devnet, timeout=120)["peers"]
        dirs = [p["data_dir"] for p in peers]
        before = accounts(dirs[0])
        assert before["balance"] == 1000 * 10**9  # the devnet's genesis allocation
        assert before["supply"] == 4 * 1000 * 10**9
        # Stake from two peers; more than the balance is refused with a reason.
        for data_dir in dirs[:2]:
            staked = mtor("stake", "25", "--json", "--data-dir", data_dir)
            assert staked.returncode == 0, staked.stderr
            assert json.loads(staked.stdout)["stake"] == 25 * 10**9
        greedy = mtor("stake", "5000", "--data-dir", dirs[2])
        assert greedy.returncode == 1 and "balance" in greedy.stderr
        sent = mtor("transfer", peers[3]["peer_id"], "7.5", "--json", "--data-dir", dirs[2])
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["balance"] == 9925 * 10**8
        # Jobs from two requesters move credits to the workers.
        for requester in (dirs[0], dirs[3]):
            job = mtor("submit", "matmul", "--m", "256", "--n", "256", "--k", "256", "--json",
                       "--data-dir", requester)  # fmt: skip
            assert job.returncode == 0, job.stderr
        # The receipts table names each receipt's ledger entry, as `ledger prove` takes it.
        table = mtor("receipts", "--data-dir", dirs[0])
        held = json.loads(mtor("receipts", "--json", "--data-dir", dirs[0]).stdout)["receipts"]
        assert table.returncode == 0 and "ENTRY" in table.stdout.splitlines()[0], table.stderr
        assert held and all(r["entry"][:12] in table.stdout for r in held if r["complete"])
        # Gossip and sync bring every peer to the same ledger.
        deadline = time.monotonic() + 60
        while True:
            views = [accounts(d) for d in dirs]
            keys = {json.dumps(v["accounts"], sort_keys=True) for v in views}
            if len(keys) == 1 and all(v["receipts"] >= 4 for v in views):
                break
            assert time.monotonic() < deadline, f"balances differ: {keys}"
            time.sleep(0.5)
        view = views[0]
        total = sum(a["balance"] + a["stake"] for a in view["accounts"].values())
        assert total + view["burned"] == view["supply"]
        # Peer 0 paid for its job. Its balance need not fall below 975 (1000 less its stake):
        # it is a worker for peer 3's job too, and when that job's one shard went to it at
        # the same price, it earned exactly what it paid (a run of the suite saw 975). The
        # ledger's own flows for it say what moved, and explain its balance to the nano.
        flows = ControlClient.for_data_dir(Path(dirs[0])).call("GET", "/v1/earnings")
        assert flows["ledger"]["paid_receipts"] >= 1 and flows["ledger"]["paid_nano"] > 0
        balance = flows["account"]["balance"]  # the same fold as the flows beside it
        ledger_flows = flows["ledger"]
        assert balance == 975 * 10**9 - ledger_flows["paid_nano"] + ledger_flows["earned_nano"]
        assert flows["reconciliation"]["unexplained_nano"] == 0
        for data_dir in dirs:
            check = mtor("ledger", "verify", "--json", "--data-dir", data_dir)
            assert check.returncode == 0, check.stdout + check.stderr
            assert json.loads(check.stdout)["ok"]
        human = mtor("balance", "--data-dir", dirs[1])
        assert "stake      25 credits" in human.stdout
        assert view["accounts"][peers[2]["peer_id"]]["balance"] >= 9925 * 10**8  # sent 7.5
    finally:
        devnet.send_signal(signal.SIGINT)
        devnet.wait(timeout=30)
    # With the nodes stopped the CLI reads the data directory itself.
    offline = accounts(dirs[0])
    assert offline["source"].startswith("data directory")
    assert offline["accounts"] == view["accounts"]
    audit = mtor("ledger", "verify", "--data-dir", dirs[0])
    assert audit.returncode == 0 and "ledger OK" in audit.stdout
    # Kinds are listed by name: a checkpoint comes first when one was signed before the devnet
    # stopped (a slow run: seen with three test processes on two cores).
    entries = r"^entries      (\d+ \w+, )*\d+ receipts\b"
    assert re.search(entries, audit.stdout, re.MULTILINE), audit.stdout
    # The receipts too, from the store on disk: the same ones, and the table says so.
    stored = mtor("receipts", "--json", "--data-dir", dirs[0])
    assert stored.returncode == 0, stored.stderr
    offline_held = json.loads(stored.stdout)["receipts"]

    def paid_by_0(receipts: list) -> list:  # complete when submit returned: they cannot change
        return [r for r in receipts if r["requester"] == peers[0]["peer_id"]]

    assert paid_by_0(offline_held) == paid_by_0(held) and paid_by_0(held)
    table = mtor("receipts", "--limit", "1", "--data-dir", dirs[0])
    assert table.returncode == 0 and "showing the receipts as stored" in table.stderr
    assert f"1 of {len(offline_held)} receipt(s)" in table.stdout
    staked_offline = mtor("stake", "1", "--json", "--data-dir", dirs[2])
    assert staked_offline.returncode == 0, staked_offline.stderr
    assert json.loads(staked_offline.stdout)["stake"] == 10**9


def _count(path, sql: str, *params: object) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute(sql, params).fetchone()[0])
    finally:
        db.close()


def test_a_peer_killed_mid_sync_restarts_consistent_and_loses_nothing_acknowledged(tmp_path):
    from mtor_p2p.identity import load_or_create_identity
    from mtor_p2p.ledger.genesis import NANO, Genesis, LedgerParams
    from mtor_p2p.ledger.store import Ledger
    from tests.ledger_data import PEERS, receipt
    from tests.processes import run_flags

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_id = load_or_create_identity(a_dir)
    gen = Genesis("kill-test", {a_id.peer_id: 100 * NANO, PEERS[0].peer_id: 10**6 * NANO},
                  LedgerParams())  # fmt: skip
    genesis_path = tmp_path / "genesis.json"
    gen.save(genesis_path)
    # B already holds 8,000 receipts (written while it was stopped); A holds nothing.
    holder = Ledger(tmp_path / "b.sqlite", gen)
    b_dir.mkdir()
    wires = [receipt(PEERS[0], PEERS[1 + i % 3], shard=i) for i in range(8000)]
    for i in range(0, len(wires), 2000):
        holder.ingest(wires[i : i + 2000])
    holder.close()
    (tmp_path / "b.sqlite").rename(b_dir / "ledger.sqlite")
    flags = ["--genesis", str(genesis_path)]
    # A runs alone first: the stake it acknowledges is made before any sync can start.
    a = start(*run_flags(a_dir), *flags)
    b = None
    try:
        a_addr = read_json_line(a)["addrs"][0]
        # A stake the CLI reports as done is durable, whatever happens next.
        staked = mtor("stake", "5", "--json", "--data-dir", str(a_dir))
        assert staked.returncode == 0, staked.stderr
        # B joins (dialling A); A pulls B's receipts from the moment they connect.
        b = start(*run_flags(b_dir), *flags, "--bootstrap", a_addr)
        b_addr = read_json_line(b)["addrs"][0]
        ledger_a = a_dir / "ledger.sqlite"
        deadline = time.monotonic() + 60
        while _count(ledger_a, "SELECT COUNT(*) FROM entries WHERE kind = 'receipt'") < 3000:
            assert time.monotonic() < deadline, "A never started pulling"
            time.sleep(0.05)
        a.send_signal(signal.SIGKILL)  # mid-sync: more batches were on their way
        a.wait(timeout=10)
        held = _count(ledger_a, "SELECT COUNT(*) FROM entries WHERE kind = 'receipt'")
        assert held < len(wires), "sync finished before the kill; the test proves nothing"
        # Restarted with the node down: consistent, the stake is there, and every entry up to
        # the cursor A had recorded for B is held.
        check = mtor("ledger", "verify", "--json", "--data-dir", str(a_dir))
        assert check.returncode == 0, check.stdout
        offline = json.loads(mtor("balance", "--json", "--data-dir", str(a_dir)).stdout)
        assert offline["stake"] == 5 * NANO
        cursor = _count(ledger_a, "SELECT COALESCE(MAX(seq), 0) FROM peer_cursors")
        assert cursor > 0
        b_before_cursor = _count(
            b_dir / "ledger.sqlite", "SELECT COUNT(*) FROM entries WHERE seq <= ?", cursor
        )
        assert held >= b_before_cursor
        # Back up, A resumes where it stopped and ends with B's whole set.
        a = start(*run_flags(a_dir), *flags, "--bootstrap", b_addr)
        read_json_line(a)
        deadline = time.monotonic() + 90
        while _count(ledger_a, "SELECT COUNT(*) FROM entries WHERE kind = 'receipt'") < 8000:
            assert time.monotonic() < deadline, "A did not finish the sync after restarting"
            time.sleep(0.2)
        balances = [
            json.loads(mtor("balance", "--all", "--json", "--data-dir", str(d)).stdout)["accounts"]
            for d in (a_dir, b_dir)
        ]
        assert balances[0] == balances[1]
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


def test_ledger_prove_takes_a_prefix_and_checks_the_path_itself(tmp_path):
    """Offline (no node on the data directory): the human lines, --json, a unique prefix, and
    the usage errors; then a tampered answer is caught by the CLI's own check."""
    from mtor_p2p.cli import _proof_holds
    from mtor_p2p.ledger.genesis import GENESIS_FILE_NAME
    from mtor_p2p.ledger.store import LEDGER_FILE_NAME, Ledger
    from tests.ledger_data import checkpointed_epoch, genesis

    data_dir = tmp_path / "peer"
    data_dir.mkdir(mode=0o700)
    gen = genesis([1000, 1000, 1000, 0])
    gen.save(data_dir / GENESIS_FILE_NAME)
    ledger = Ledger(data_dir / LEDGER_FILE_NAME, gen)
    leaves = checkpointed_epoch(ledger, gen, 1_800_000_000.0)
    ledger.close()
    entry = leaves[2]
    human = mtor("ledger", "prove", entry[:12], "--data-dir", str(data_dir))
    assert human.returncode == 0, human.stderr
    assert f"entry        {entry}  (receipt, epoch " in human.stdout
    assert "…  final\n" in human.stdout
    assert "3 signer(s) holding 100.0% of the weight now (stake net of debt); 6 entries" in (
        human.stdout
    )
    assert "leaves, leading to that root\n" in human.stdout
    assert f"(ENTRY {entry[:12]} is {entry})" in human.stderr  # the prefix, expanded
    as_json = mtor("ledger", "prove", entry, "--json", "--data-dir", str(data_dir))
    assert as_json.returncode == 0, as_json.stderr
    proof = json.loads(as_json.stdout)
    assert proof["entry"] == entry and _proof_holds(proof, entry[:12])
    for wrong in (entry[:7], "z" * 12, entry + "00"):  # usage errors: exit 2
        refused = mtor("ledger", "prove", wrong, "--data-dir", str(data_dir))
        assert refused.returncode == 2 and "8-64 hex digits" in refused.stderr, wrong
    unknown = mtor("ledger", "prove", "0" * 16, "--data-dir", str(data_dir))
    assert unknown.returncode == 1 and "not the JOB column" in unknown.stderr
    extra = mtor("ledger", "verify", entry, "--data-dir", str(data_dir))
    assert extra.returncode == 2 and "takes no ENTRY" in extra.stderr
    # A path that does not lead to the root (a node's answer is only a claim).
    lying = json.loads(json.dumps(proof))
    lying["proof"]["path"][0] = "00" * 32
    assert not _proof_holds(lying, entry)
    other = json.loads(json.dumps(proof))
    other["entry"] = leaves[3]  # claims another entry than its path's
    assert not _proof_holds(other, entry)
    assert not _proof_holds(proof, leaves[3][:12])  # a good proof, of another entry
    assert not _proof_holds({"entry": entry}, entry)
    assert not _proof_holds(["not", "a", "proof"], entry)


def test_read_only_commands_on_a_stopped_or_missing_node_create_nothing(tmp_path):
    """Offline receipts need no identity (and make none); a damaged store is one line, not a
    traceback; a damaged control.json is no running node; a mistyped --data-dir is not made
    into a new node's directory by balance or ledger."""
    import sqlite3

    from mtor_p2p.compute.receipt_store import RECEIPTS_FILE_NAME, ReceiptStore
    from mtor_p2p.control import INFO_FILE_NAME
    from mtor_p2p.records.receipts import decode_receipt
    from tests.ledger_data import PEERS, receipt

    data_dir = tmp_path / "peer"
    data_dir.mkdir(mode=0o700)
    store = ReceiptStore(data_dir / RECEIPTS_FILE_NAME)
    store.add(decode_receipt(receipt(PEERS[0], PEERS[1])[1:]))
    store.close()
    (data_dir / INFO_FILE_NAME).write_text('{"pid": 1}')  # damaged: no url
    listed = mtor("receipts", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    assert "showing the receipts as stored" in listed.stderr
    assert " ?  " in listed.stdout and "1 receipt(s)" in listed.stdout  # no key: role unknown
    assert not (data_dir / "identity.key").exists()
    # A hand-edited store: one receipt column holds text, another bytes that are no receipt.
    # Those rows are left out and named, the rest listed, as the running node's listing does
    # (before 2026-12-06 the offline listing refused the whole file).
    store = ReceiptStore(data_dir / RECEIPTS_FILE_NAME)
    for worker in PEERS[2:4]:
        store.add(decode_receipt(receipt(worker, PEERS[1])[1:]))
    store.close()
    db = sqlite3.connect(data_dir / RECEIPTS_FILE_NAME)
    rows = [row[0] for row in db.execute("SELECT rowid FROM receipts ORDER BY rowid")]
    db.execute("UPDATE receipts SET encoded = 'not bytes' WHERE rowid = ?", (rows[0],))
    db.execute("UPDATE receipts SET encoded = ? WHERE rowid = ?", (b'{"t":1}', rows[1]))
    db.commit()
    db.close()
    damaged = mtor("receipts", "--data-dir", str(data_dir))
    assert damaged.returncode == 0, damaged.stderr
    assert "2 stored row(s) hold no receipt" in damaged.stderr
    assert "1 receipt(s)" in damaged.stdout and "Traceback" not in damaged.stderr
    as_json = json.loads(mtor("receipts", "--json", "--data-dir", str(data_dir)).stdout)
    assert (as_json["count"], as_json["skipped"], len(as_json["receipts"])) == (3, 2, 1)
    # The damaged rows do not use up --limit: the newest receipt is listed past them.
    newest = json.loads(
        mtor("receipts", "--json", "--limit", "1", "--data-dir", str(data_dir)).stdout
    )
    assert len(newest["receipts"]) == 1
    typo = tmp_path / "pear"
    for command in (["balance"], ["ledger", "verify"], ["ledger", "prove", "ab" * 6]):
        missing = mtor(*command, "--data-dir", str(typo))
        assert missing.returncode == 3 and "no data directory" in missing.stderr, command
    assert not typo.exists()


def test_a_data_directory_of_another_network_is_refused_naming_both_networks(tmp_path):
    """``run --genesis`` on a data directory that began under another genesis says which
    networks they are and what to run instead, not two hashes alone, and says it first
    (new users' walkthroughs); without the directory's copy of its genesis, the hashes are
    all there is."""
    from mtor_p2p.config import NodeConfig
    from mtor_p2p.ledger.genesis import GENESIS_FILE_NAME, Genesis, LedgerParams
    from mtor_p2p.node import open_ledger
    from tests.processes import run_flags

    alpha, beta = tmp_path / "alpha.json", tmp_path / "beta.json"
    Genesis("alpha-net", {}, LedgerParams()).save(alpha)
    Genesis("beta-net", {}, LedgerParams()).save(beta)
    data_dir = tmp_path / "peer"
    open_ledger(NodeConfig(data_dir=data_dir, genesis=alpha)).close()
    # The shipped bootstrap list and the GPU probe as a new user's `run` has them: the
    # refusal comes before either is looked at, alone (two warnings came first before).
    refused = mtor(
        "run", "--data-dir", str(data_dir), "--listen", "/ip4/127.0.0.1/tcp/0",
        "--genesis", str(beta),
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    line = refused.stderr.strip()
    assert "follows the network 'alpha-net'" in line and "not 'beta-net'" in line, line
    assert "start without a genesis (no --genesis, no genesis in the config file" in line, line
    assert str(data_dir / GENESIS_FILE_NAME) in line, line
    assert "Traceback" not in refused.stderr
    (data_dir / GENESIS_FILE_NAME).unlink()
    bare = mtor(*run_flags(data_dir), "--genesis", str(beta))
    assert bare.returncode == 2 and "belongs to the network with genesis" in bare.stderr


def test_the_refusal_tells_same_named_networks_apart_and_survives_a_damaged_copy(tmp_path):
    """Every devnet is named alike: the refusal then tells the two networks apart by their
    hashes. A damaged copy of the directory's genesis (not UTF-8, a FIFO) leaves the refusal
    its hashes alone, at once (a FIFO had blocked the reader); when the ledger is this
    network's, such a copy is written again (a review of the refusal)."""
    import os

    import pytest

    from mtor_p2p.config import NodeConfig
    from mtor_p2p.ledger.genesis import GENESIS_FILE_NAME, Genesis, LedgerParams, load_genesis
    from mtor_p2p.ledger.names import OtherNetworkLedger
    from mtor_p2p.node import open_ledger
    from tests.ledger_data import PEERS

    first, second = tmp_path / "first.json", tmp_path / "second.json"
    Genesis("same-net", {}, LedgerParams()).save(first)
    Genesis("same-net", {PEERS[0].peer_id: 5}, LedgerParams()).save(second)
    data_dir = tmp_path / "peer"
    open_ledger(NodeConfig(data_dir=data_dir, genesis=first)).close()
    with pytest.raises(OtherNetworkLedger) as refused:
        open_ledger(NodeConfig(data_dir=data_dir, genesis=second))
    text = str(refused.value)
    held, wanted = load_genesis(first).hash[:16], load_genesis(second).hash[:16]
    assert f"another network named 'same-net' (genesis {held}...)" in text, text
    assert f"not the one of genesis {wanted}..." in text, text
    copy = data_dir / GENESIS_FILE_NAME
    for damage in ("bytes", "fifo"):
        copy.unlink()
        if damage == "bytes":
            copy.write_bytes(b"\xff\xfe not utf-8")
        else:
            os.mkfifo(copy)
        with pytest.raises(OtherNetworkLedger, match="belongs to the network with genesis"):
            open_ledger(NodeConfig(data_dir=data_dir, genesis=second))
        open_ledger(NodeConfig(data_dir=data_dir, genesis=first)).close()
        assert load_genesis(copy).hash == load_genesis(first).hash  # written again
