#!/usr/bin/env bash
# Two private peers and one public peer on this machine, behind real NATs (nat-lab.sh):
# watch the private peers find out they are private, reserve on the public relay, reach each
# other through it, punch a hole to a direct connection, and run a matrix job over it.
#
#   sudo bootstrap/nat-demo.sh [--nat-b port-preserving|symmetric] [--keep]
#
# --nat-b symmetric puts b behind a NAT that changes ports per destination: the punch fails,
#   status says why, and the job cannot reach b (its operands never cross a relay).
# --keep leaves the lab and the peers running at the end (stop with: nat-lab.sh down).
# Needs root, ip and iptables (nat-lab.sh check says what is missing). Files: $MTOR_DEMO_DIR
# (default a new directory under /tmp): the peers' data directories and their logs.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(cd "$HERE/.." && pwd -P)
LAB="$HERE/nat-lab.sh"
NAME=mtordemo
NAT_B=port-preserving
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nat-b)
      [ $# -ge 2 ] || { echo "nat-demo: --nat-b needs port-preserving or symmetric" >&2; exit 2; }
      NAT_B=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "nat-demo: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$NAT_B" in
  port-preserving|symmetric) ;;
  *) echo "nat-demo: --nat-b $NAT_B: give port-preserving or symmetric" >&2; exit 2 ;;
esac
if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
if ! "$PY" -c "import mtor_p2p" 2>/dev/null; then
  echo "nat-demo: mtor_p2p is not installed: run $ROOT/mtor devnet --help once (it installs it)" >&2
  exit 2
fi
"$LAB" check >/dev/null || { "$LAB" check; exit 1; }
DIR=${MTOR_DEMO_DIR:-$(mktemp -d /tmp/mtor-nat-demo.XXXXXX)}
PORT=4001

cleanup() {
  if [ "$KEEP" = 0 ]; then
    # Stop the peers the way Ctrl-C would (they withdraw their records), then the lab.
    for pid in $(jobs -p); do kill -INT "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "$LAB" down --name "$NAME" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
"$LAB" down --name "$NAME" >/dev/null 2>&1 || true
"$LAB" up --name "$NAME" --nat-b "$NAT_B"

# A genesis that gives each peer credits (the requester pays its workers), and their IDs.
"$PY" - "$DIR" <<'EOF'
import sys
from pathlib import Path
from mtor_p2p.devnet import Devnet
from mtor_p2p.identity import load_or_create_identity
base = Path(sys.argv[1])
Devnet(base, record_ttl=20.0, announce_interval=5.0, log_level="info").write_genesis(3)
for i, name in enumerate(("relay", "a", "b")):
    (base / f"{name}.id").write_text(load_or_create_identity(base / f"peer-{i}").peer_id)
EOF
RELAY_ID=$(cat "$DIR/relay.id"); A_ID=$(cat "$DIR/a.id"); B_ID=$(cat "$DIR/b.id")
RELAY_ADDR=/ip4/203.0.113.10/tcp/$PORT/p2p/$RELAY_ID

peer() {  # peer NAME INDEX IP [flags...]: start mtor-peer run in that namespace
  local name=$1 index=$2 ip=$3; shift 3
  "$LAB" exec --name "$NAME" "$name" -- "$PY" -m mtor_p2p run \
    --data-dir "$DIR/peer-$index" --listen "/ip4/$ip/tcp/$PORT" --no-default-bootstrap \
    --gpu none --record-ttl 20 --announce-interval 5 --genesis "$DIR/genesis.json" \
    --log-level info "$@" >"$DIR/$name.log" 2>&1 &
}
cli() {  # cli NAME INDEX command...: a mtor-peer command against that peer
  local name=$1 index=$2; shift 2
  "$LAB" exec --name "$NAME" "$name" -- "$PY" -m mtor_p2p "$@" --data-dir "$DIR/peer-$index"
}

echo "== public relay 203.0.113.10 ($RELAY_ID); a 10.0.1.2 and b 10.0.2.2 behind NATs ($NAT_B on b)"
peer relay 0 203.0.113.10 --bootstrap-node --relay on --price 1000 --fixed-price
sleep 1
peer a 1 10.0.1.2 --bootstrap "$RELAY_ADDR" --relay off
peer b 2 10.0.2.2 --bootstrap "$RELAY_ADDR" --relay off
echo "   logs and data: $DIR"

watch() {  # one line from one status of each private peer: "<a->b link> | <a's reachability>"
  local a_json b_json
  a_json=$(cli a 1 status --json 2>/dev/null || echo '{}')
  b_json=$(cli b 2 status --json 2>/dev/null || echo '{}')
  "$PY" - "$A_ID" "$B_ID" "$a_json" "$b_json" <<'PYEOF'
import json, sys
a_id, b_id, a_raw, b_raw = sys.argv[1:5]
def load(raw):
    try:
        return json.loads(raw).get("reachability") or {}
    except ValueError:
        return {}
a, b = load(a_raw), load(b_raw)
if not a:
    print("starting"); sys.exit()
punches = [p for p in a.get("hole_punches") or [] if p["peer"] == b_id]
punches += [p for p in b.get("hole_punches") or [] if p["peer"] == a_id]
punch = ""
if any(p["direct"] for p in punches):
    punch = " (punched in %.2f s)" % min(p["seconds"] for p in punches if p["direct"])
elif punches:
    punch = " (hole punch failed)"
kind = (a.get("connections") or {}).get(b_id, "none")
print("a->b %s%s | a: %s (%s); NAT %s" % (kind, punch, a.get("summary"), a.get("reason"), a.get("nat")))
PYEOF
}
echo "== watching a's status (every 2 s, up to 90 s; Ctrl-C stops the demo)"
last="" quiet=0
for _ in $(seq 1 45); do
  sleep 2
  now=$(watch)
  if [ "$now" != "$last" ]; then echo "   $now"; last=$now; quiet=0; else quiet=$((quiet + 1)); fi
  if [ "$quiet" -ge 10 ]; then echo "   (no change for 20 s: still waiting)"; quiet=0; fi
  case "$now" in
    "a->b direct"*"a: private"*) break ;;
    *"hole punch failed"*"a: private"*|*"hole punch failed"*"a: unknown"*) break ;;
  esac
done
echo "== b's view of itself"
cli b 2 status | grep '^reachable' || true

echo "== a submits a 256x256 matrix product; the relay is priced out (1000), so it runs on b"
if cli a 1 submit matmul --m 256 --n 256 --k 256 --max-price 10; then
  echo "== done: the job's operands and result crossed the punched direct connection"
else
  echo "== the job did not run: b is reachable only through the relay, which carries"
  echo "   coordination, never operands (a tunnel, e.g. nat-lab.sh forward b $PORT and"
  echo "   run --announce /ip4/203.0.113.12/tcp/$PORT on b, would carry them)"
fi
echo "== router a's connection table (the punched flow is the one between the routers' WANs):"
"$LAB" conntrack --name "$NAME" a 2>/dev/null | grep -E "203\.0\.113\.1[12]" | grep "dport=$PORT" || true
if [ "$KEEP" = 1 ]; then
  echo "== kept running: $LAB exec --name $NAME a -- $PY -m mtor_p2p status --data-dir $DIR/peer-1"
  echo "   stop with: $LAB down --name $NAME"
fi
