"""``mtor-peer balance``, ``stake`` and ``ledger verify`` on the README's devnet, as real
subprocesses: every peer ends up with the same balances, and the supply is conserved."""

from __future__ import annotations

import json
import signal
import time

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
        # Jobs from two requesters move credits to the workers.
        for requester in (dirs[0], dirs[3]):
            job = mtor("submit", "matmul", "--m", "256", "--n", "256", "--k", "256", "--json",
                       "--data-dir", requester)  # fmt: skip
            assert job.returncode == 0, job.stderr
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
        assert view["accounts"][peers[0]["peer_id"]]["balance"] < 975 * 10**9  # paid
        for data_dir in dirs:
            check = mtor("ledger", "verify", "--json", "--data-dir", data_dir)
            assert check.returncode == 0, check.stdout + check.stderr
            assert json.loads(check.stdout)["ok"]
        human = mtor("balance", "--data-dir", dirs[1])
        assert "stake      25 credits" in human.stdout
    finally:
        devnet.send_signal(signal.SIGINT)
        devnet.wait(timeout=30)
    # With the nodes stopped the CLI reads the data directory itself.
    offline = accounts(dirs[0])
    assert offline["source"].startswith("data directory")
    assert offline["accounts"] == view["accounts"]
    assert mtor("ledger", "verify", "--data-dir", dirs[0]).returncode == 0
    staked_offline = mtor("stake", "1", "--json", "--data-dir", dirs[2])
    assert staked_offline.returncode == 0, staked_offline.stderr
    assert json.loads(staked_offline.stdout)["stake"] == 10**9
