#!/bin/sh
# Forms the Redis Cluster of the compose "cluster" profile, once (the `redis-cluster-init` service;
# tests/test_compose.py runs it on loopback). Idempotent: a cluster whose slots are all assigned is
# left as it is, so a restart of the stack does not try to form it again.
#   COLDWARM_CLUSTER_NODES      "host:port ..." of every node, masters first (redis-cli pairs the rest
#                               as their replicas)
#   COLDWARM_CLUSTER_REPLICAS   replicas per master (1)
#   COLDWARM_CLUSTER_WAIT_S     how long to wait for the nodes to answer and the cluster to be ok (60)
# CLUSTER MEET takes addresses, not names (redis/redis#11148), so the compose service names are resolved
# to IPv4 addresses here; the nodes announce their names (cluster-announce-hostname), which is what
# clients are redirected to.
set -eu

log() { printf 'redis-cluster-init: %s\n' "$*" >&2; }

: "${COLDWARM_CLUSTER_NODES:?set COLDWARM_CLUSTER_NODES to the host:port list of the nodes}"
: "${COLDWARM_CLUSTER_REPLICAS:=1}"
: "${COLDWARM_CLUSTER_WAIT_S:=60}"

host_of() { printf '%s' "${1%:*}"; }
port_of() { printf '%s' "${1##*:}"; }

# Succeeds once `redis-cli ... $*` has printed a line matching the pattern $1, within the wait.
wait_until() {
    pattern=$1
    shift
    waited=0
    until redis-cli "$@" 2>/dev/null | grep -q "$pattern"; do
        if [ "$waited" -ge "$COLDWARM_CLUSTER_WAIT_S" ]; then
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

for node in $COLDWARM_CLUSTER_NODES; do
    wait_until PONG -h "$(host_of "$node")" -p "$(port_of "$node")" ping \
        || { log "$node did not answer within ${COLDWARM_CLUSTER_WAIT_S}s"; exit 1; }
done

# shellcheck disable=SC2086 # split into one argument per node
set -- $COLDWARM_CLUSTER_NODES
first_host=$(host_of "$1")
first_port=$(port_of "$1")
assigned=$(redis-cli -h "$first_host" -p "$first_port" cluster info | tr -d '\r' \
    | sed -n 's/^cluster_slots_assigned://p')
if [ "$assigned" = "16384" ]; then
    log "the cluster is already formed: nothing to do"
    exit 0
elif [ "$assigned" != "0" ]; then
    log "$1 has ${assigned} of 16384 slots assigned: a half-formed cluster, fix it by hand (redis-cli --cluster fix)"
    exit 1
fi

addresses=""
for node in "$@"; do
    address=$(getent ahostsv4 "$(host_of "$node")" | awk 'NR == 1 { print $1 }')
    if [ -z "$address" ]; then
        log "cannot resolve $(host_of "$node")"
        exit 1
    fi
    addresses="$addresses $address:$(port_of "$node")"
done
log "forming a cluster of$addresses with $COLDWARM_CLUSTER_REPLICAS replica(s) per master"
# shellcheck disable=SC2086 # one argument per address
redis-cli --cluster create $addresses --cluster-replicas "$COLDWARM_CLUSTER_REPLICAS" --cluster-yes
wait_until 'cluster_state:ok' -h "$first_host" -p "$first_port" cluster info \
    || { log "the cluster is not ok after ${COLDWARM_CLUSTER_WAIT_S}s"; exit 1; }
log "cluster ok"
