#!/usr/bin/env bash
# A NAT lab on one machine: network namespaces, veth pairs, a bridge and iptables build a small
# "internet" with a public relay, a firewalled public host and two private hosts, each behind
# its own home-router NAT. Needs root, iproute2 and iptables (Debian: apt-get install iptables
# conntrack; ../.ci/system-packages does it). Run with --help for the commands.
#
# Topology (P is the prefix, default mtorlab; every name below is a namespace):
#
#            P-relay 203.0.113.10      P-fw 203.0.113.20 (drops unsolicited inbound)
#                      \                 /
#                 P-pub: bridge br0, the "internet" 203.0.113.0/24
#                      /                 \
#     WAN 203.0.113.11 P-ra              P-rb WAN 203.0.113.12      routers: NAT (MASQUERADE),
#     LAN 10.0.1.1     |                   |  LAN 10.0.2.1          inbound from WAN dropped
#             P-a 10.0.1.2              P-b 10.0.2.2                private hosts
#
# Nothing routes to or from the root namespace: traffic stays between these namespaces.
set -euo pipefail

PREFIX=mtorlab
NAT_A="port-preserving"
NAT_B="port-preserving"
NODES=(pub relay fw ra a rb b)

usage() {
  cat <<'EOF'
Usage: nat-lab.sh COMMAND [--name P] [args]

A NAT lab in network namespaces named P-<node> (P defaults to mtorlab; --name keeps parallel
labs apart). Needs root, ip (iproute2) and iptables.

Commands:
  up [--nat-a port-preserving|symmetric] [--nat-b port-preserving|symmetric]
        build the lab (both NATs port-preserving unless told; symmetric = MASQUERADE
        --random-fully, a new source port for every connection)
  down  delete the lab and stop every process left in its namespaces (idempotent)
  exec NODE -- CMD...
        run CMD in P-NODE; NODE is one of relay, a, b, fw, ra, rb (pub: the bridge)
  forward a|b PORT     a port forward on that side's router: TCP to its WAN address:PORT goes
                       to the private host's PORT (a stand-in for an ngrok tunnel)
  unforward a|b PORT   remove it
  firewall relay|fw on|off
        drop unsolicited inbound on a public host (allow lo and ESTABLISHED,RELATED; drop the
        rest); fw has it on after `up`, relay off
  conntrack a|b        print that side's router's connection-tracking table (needs conntrack)
  addr NODE            print NODE's address (a router prints its WAN address)
  check                exit 0 if namespaces, veth pairs, a bridge and iptables NAT work here;
                       otherwise print one line saying why and exit 1

Addresses: relay 203.0.113.10, fw 203.0.113.20, ra 203.0.113.11 (LAN 10.0.1.1),
rb 203.0.113.12 (LAN 10.0.2.1), a 10.0.1.2, b 10.0.2.2. Loopback is up everywhere.

Examples:
  sudo bootstrap/nat-lab.sh up --nat-b symmetric
  sudo bootstrap/nat-lab.sh exec relay -- python3 -m http.server --bind 203.0.113.10 8000
  sudo bootstrap/nat-lab.sh exec a -- curl -s http://203.0.113.10:8000/
  sudo bootstrap/nat-lab.sh conntrack a
  sudo bootstrap/nat-lab.sh down
EOF
}

die() {
  echo "nat-lab: $*" >&2
  exit 1
}

ns() { echo "$PREFIX-$1"; }

in_ns() {
  local node=$1
  shift
  ip netns exec "$(ns "$node")" "$@"
}

addr_of() {
  case "$1" in
    relay) echo 203.0.113.10 ;;
    fw) echo 203.0.113.20 ;;
    ra) echo 203.0.113.11 ;;
    rb) echo 203.0.113.12 ;;
    a) echo 10.0.1.2 ;;
    b) echo 10.0.2.2 ;;
    *) die "no address for node '$1' (one of relay, fw, ra, rb, a, b)" ;;
  esac
}

ns_exists() { [ -e "/run/netns/$(ns "$1")" ]; }

need_tools() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces and iptables)"
  command -v ip >/dev/null || die "ip (iproute2) is not installed"
  command -v iptables >/dev/null \
    || die "iptables is not installed (apt-get install -y iptables conntrack)"
}

need_lab() {
  ns_exists pub || die "no lab named '$PREFIX' (run: nat-lab.sh up --name $PREFIX)"
}

# --- building --------------------------------------------------------------------------------

new_ns() {
  local name
  name=$(ns "$1")
  ip netns add "$name"
  in_ns "$1" ip link set lo up
  # IPv4 only: no IPv6 link-local chatter, no address outside the documented ones.
  in_ns "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null || true
  in_ns "$1" sysctl -qw net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
}

# A veth pair created inside namespace $1 (named $2) with its other end in $3 (named $4): the
# names never exist in the root namespace, so labs with different prefixes never collide.
veth() {
  ip -n "$(ns "$1")" link add "$2" type veth peer name "$4" netns "$(ns "$3")"
  ip -n "$(ns "$1")" link set "$2" up
  ip -n "$(ns "$3")" link set "$4" up
}

# A public host or router WAN: a port on the bridge in P-pub.
attach_public() {
  local node=$1 ifname=$2 address=$3
  veth pub "p-$node" "$node" "$ifname"
  ip -n "$(ns pub)" link set "p-$node" master br0
  ip -n "$(ns "$node")" addr add "$address/24" dev "$ifname"
}

firewall_rules() {
  # The host's own INPUT, in a chain of its own so that `firewall off` removes exactly it.
  local node=$1 state=$2
  in_ns "$node" iptables -w -F LABFW 2>/dev/null || in_ns "$node" iptables -w -N LABFW
  in_ns "$node" iptables -w -C INPUT -j LABFW 2>/dev/null || in_ns "$node" iptables -w -A INPUT -j LABFW
  if [ "$state" = on ]; then
    in_ns "$node" iptables -w -A LABFW -i lo -j ACCEPT
    in_ns "$node" iptables -w -A LABFW -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    in_ns "$node" iptables -w -A LABFW -j DROP  # NEW (and INVALID): dropped silently
  fi
}

router() {
  local side=$1 wan=$2 lan_net=$3 nat=$4
  local r="r$side" host=$side random=""
  [ "$nat" = symmetric ] && random=" --random-fully"
  new_ns "$r"
  new_ns "$host"
  attach_public "$r" wan "$wan"
  veth "$r" lan "$host" eth0
  ip -n "$(ns "$r")" addr add "$lan_net.1/24" dev lan
  ip -n "$(ns "$host")" addr add "$lan_net.2/24" dev eth0
  ip -n "$(ns "$host")" route add default via "$lan_net.1"
  in_ns "$r" sysctl -qw net.ipv4.ip_forward=1
  # A home router: NAT out of the WAN, forward LAN->WAN and the replies only, and drop whatever
  # else comes in on the WAN without an answer (no RST, no ICMP).
  in_ns "$r" iptables-restore -w <<EOF
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o wan -j MASQUERADE$random
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -i wan -j DROP
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i lan -o wan -j ACCEPT
COMMIT
EOF
}

cmd_up() {
  need_tools
  for nat in "$NAT_A" "$NAT_B"; do
    case "$nat" in
      port-preserving | symmetric) ;;
      *) die "NAT type '$nat': port-preserving or symmetric" ;;
    esac
  done
  for node in "${NODES[@]}"; do
    ! ns_exists "$node" || die "$(ns "$node") exists already (nat-lab.sh down --name $PREFIX)"
  done
  # A lab half built is a lab torn down (set -e exits on the first failing step).
  trap 'echo "nat-lab: up failed; removing what it made" >&2; cmd_down >/dev/null 2>&1' EXIT
  new_ns pub
  ip -n "$(ns pub)" link add br0 type bridge
  ip -n "$(ns pub)" link set br0 up
  new_ns relay
  attach_public relay eth0 203.0.113.10
  new_ns fw
  attach_public fw eth0 203.0.113.20
  firewall_rules fw on
  router a 203.0.113.11 10.0.1 "$NAT_A"
  router b 203.0.113.12 10.0.2 "$NAT_B"
  trap - EXIT
  echo "nat-lab: $PREFIX up (NAT a: $NAT_A, NAT b: $NAT_B; fw firewall on)"
}

cmd_down() {
  [ "$(id -u)" = 0 ] || die "needs root"
  local node name pids
  for node in "${NODES[@]}"; do
    name=$(ns "$node")
    [ -e "/run/netns/$name" ] || continue
    pids=$(ip netns pids "$name" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086 # one PID per word
      kill -TERM $pids 2>/dev/null || true
      for _ in 1 2 3 4 5 6 7 8 9 10; do
        [ -z "$(ip netns pids "$name" 2>/dev/null || true)" ] && break
        sleep 0.1
      done
      pids=$(ip netns pids "$name" 2>/dev/null || true)
      # shellcheck disable=SC2086
      [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$name" 2>/dev/null || true
  done
  echo "nat-lab: $PREFIX down"
}

cmd_exec() {
  [ $# -ge 1 ] || die "exec NODE -- CMD..."
  local node=$1
  shift
  [ "${1:-}" = -- ] && shift
  [ $# -ge 1 ] || die "exec $node -- CMD...: no command"
  case "$node" in
    pub | relay | fw | ra | a | rb | b) ;;
    *) die "node '$node': one of relay, a, b, fw, ra, rb, pub" ;;
  esac
  need_lab
  exec ip netns exec "$(ns "$node")" "$@"
}

forward_rules() {
  local op=$1 side=$2 port=$3 host
  case "$side" in a | b) ;; *) die "side '$side': a or b" ;; esac
  if ! [[ $port =~ ^[0-9]{1,5}$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    die "port '$port': 1..65535"
  fi
  need_tools
  need_lab
  host=$(addr_of "$side")
  local dnat=(PREROUTING -i wan -p tcp --dport "$port" -j DNAT --to-destination "$host:$port")
  local allow=(FORWARD -i wan -o lan -p tcp -d "$host" --dport "$port" -m conntrack --ctstate DNAT -j ACCEPT)
  if [ "$op" = add ]; then
    in_ns "r$side" iptables -w -t nat -C "${dnat[@]}" 2>/dev/null \
      || in_ns "r$side" iptables -w -t nat -A "${dnat[@]}"
    in_ns "r$side" iptables -w -C "${allow[@]}" 2>/dev/null \
      || in_ns "r$side" iptables -w -A "${allow[@]}"
    echo "nat-lab: $(addr_of "r$side"):$port -> $host:$port (tcp)"
  else
    while in_ns "r$side" iptables -w -t nat -C "${dnat[@]}" 2>/dev/null; do
      in_ns "r$side" iptables -w -t nat -D "${dnat[@]}"
    done
    while in_ns "r$side" iptables -w -C "${allow[@]}" 2>/dev/null; do
      in_ns "r$side" iptables -w -D "${allow[@]}"
    done
    echo "nat-lab: $(addr_of "r$side"):$port forward removed"
  fi
}

cmd_firewall() {
  [ $# -eq 2 ] || die "firewall relay|fw on|off"
  case "$1" in relay | fw) ;; *) die "firewall: node '$1' is not a public host (relay or fw)" ;; esac
  case "$2" in on | off) ;; *) die "firewall: '$2' is not on or off" ;; esac
  need_tools
  need_lab
  firewall_rules "$1" "$2"
  echo "nat-lab: $(ns "$1") firewall $2"
}

cmd_conntrack() {
  [ $# -eq 1 ] || die "conntrack a|b"
  case "$1" in a | b) ;; *) die "side '$1': a or b" ;; esac
  command -v conntrack >/dev/null || die "conntrack is not installed (apt-get install -y conntrack)"
  need_lab
  in_ns "r$1" conntrack -L 2>&1
}

cmd_check() {
  local why="" probe="natlabchk$$"
  if [ "$(id -u)" != 0 ]; then
    why="needs root (uid $(id -u)) to create network namespaces"
  elif ! command -v ip >/dev/null; then
    why="ip (iproute2) is not installed"
  elif ! command -v iptables >/dev/null; then
    why="iptables is not installed (apt-get install -y iptables conntrack)"
  else
    local err
    if ! err=$(ip netns add "$probe" 2>&1); then
      why="cannot create network namespaces: ${err//$'\n'/ }"
    else
      if ! err=$(ip -n "$probe" link add c0 type veth peer name c1 2>&1); then
        why="cannot create veth pairs: ${err//$'\n'/ }"
      elif ! err=$(ip -n "$probe" link add br0 type bridge 2>&1); then
        why="cannot create a bridge: ${err//$'\n'/ }"
      elif ! err=$(ip netns exec "$probe" iptables -w -t nat -A POSTROUTING -o c0 \
        -j MASQUERADE --random-fully 2>&1); then
        why="iptables NAT does not work in a namespace: ${err//$'\n'/ }"
      elif ! err=$(ip netns exec "$probe" iptables -w -A FORWARD \
        -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT 2>&1); then
        why="iptables conntrack match does not work in a namespace: ${err//$'\n'/ }"
      fi
      ip netns del "$probe" 2>/dev/null || true
    fi
  fi
  if [ -n "$why" ]; then
    echo "nat-lab: $why"
    return 1
  fi
  return 0
}

# --- arguments -------------------------------------------------------------------------------

[ $# -ge 1 ] || {
  usage >&2
  exit 2
}
COMMAND=$1
shift
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --name)
      [ $# -ge 2 ] || die "--name needs a value"
      PREFIX=$2
      shift 2
      ;;
    --nat-a | --nat-b)
      [ $# -ge 2 ] || die "$1 needs a value"
      if [ "$1" = --nat-a ]; then NAT_A=$2; else NAT_B=$2; fi
      shift 2
      ;;
    --)
      ARGS+=("$@")
      break
      ;;
    *)
      ARGS+=("$1")
      shift
      ;;
  esac
done
# Namespace names become paths under /run/netns: a short, plain prefix.
[[ $PREFIX =~ ^[A-Za-z0-9_]{1,24}$ ]] || die "--name '$PREFIX': letters, digits, _ (1-24)"

set -- ${ARGS[@]+"${ARGS[@]}"}
case "$COMMAND" in
  -h | --help | help) usage ;;
  up) [ $# -eq 0 ] || die "up: unexpected '$1'"; cmd_up ;;
  down) cmd_down ;;
  exec) cmd_exec "$@" ;;
  forward) [ $# -eq 2 ] || die "forward a|b PORT"; forward_rules add "$@" ;;
  unforward) [ $# -eq 2 ] || die "unforward a|b PORT"; forward_rules del "$@" ;;
  firewall) cmd_firewall "$@" ;;
  conntrack) cmd_conntrack "$@" ;;
  addr) [ $# -eq 1 ] || die "addr NODE"; addr_of "$1" ;;
  check) cmd_check ;;
  *) die "unknown command '$COMMAND' (see --help)" ;;
esac
