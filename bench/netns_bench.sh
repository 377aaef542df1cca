#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces A and B (10.99.7.1 and 10.99.7.2), joined by one veth pair, or
# with BRIDGE=1 each by its own veth pair to a bridge in the root namespace (as hosts on a switch; this is what
# sage_transport.testing.hosts builds). RATE (e.g. RATE=10gbit) shapes A's sending end with tc tbf. Runs the link
# bench's TCP rows with the receiver in B, then ucx_perftest over TCP on the same path as the reference.
#   sudo bench/netns_bench.sh [--quick] [--only ROW...]      (needs root; removes its namespaces on exit)
set -euo pipefail
cd "$(dirname "$0")/.."
A=sgbenchA; B=sgbenchB; BR=sgbenchbr
cleanup() {
  ip netns del $A 2>/dev/null || true; ip netns del $B 2>/dev/null || true; ip link del $BR 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add $A; ip netns add $B
if [ -n "${BRIDGE:-}" ]; then
  ip link add $BR type bridge; ip link set $BR up
  for ns in $A $B; do
    ip link add v$ns type veth peer name b$ns
    ip link set v$ns netns $ns; ip link set b$ns master $BR; ip link set b$ns up
  done
  ip -n $A link set v$A name vbenchA; ip -n $B link set v$B name vbenchB
else
  ip link add vbenchA type veth peer name vbenchB
  ip link set vbenchA netns $A; ip link set vbenchB netns $B
fi
ip -n $A addr add 10.99.7.1/24 dev vbenchA; ip -n $B addr add 10.99.7.2/24 dev vbenchB
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set vbenchA up; ip -n $B link set vbenchB up
if [ -n "${RATE:-}" ]; then ip netns exec $A tc qdisc add dev vbenchA root tbf rate "$RATE" burst 1mb latency 10ms; fi
ip netns exec $A .venv/bin/python bench/link_bench.py --netns $B --host 10.99.7.2 --out bench/results/link_veth "$@"
# reference in the same sitting: ucx_perftest over the veth pair (TCP), server in B
LIB=$(.venv/bin/python -c "import libucx, os; print(os.path.dirname(libucx.__file__))")
for size in 1048576 67108864; do
  ip netns exec $B env LD_LIBRARY_PATH=$LIB/lib UCX_TLS=tcp "$LIB/bin/ucx_perftest" -p 13555 >/dev/null 2>&1 &
  sleep 0.5
  echo "ucx_perftest tcp over veth, $size bytes:"
  ip netns exec $A env LD_LIBRARY_PATH=$LIB/lib UCX_TLS=tcp "$LIB/bin/ucx_perftest" 10.99.7.2 -p 13555 -t tag_bw -s $size -n $((2147483648 / size)) -w 10 | grep Final
  wait
done
