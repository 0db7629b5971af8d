#!/bin/sh
# The compose stack's one-shot offline job (the `trainer` service; the images install it as
# /usr/local/bin/coldwarm-trainer). In order:
#   1. COLDWARM_DATA=movielens-1m: `coldwarm data fetch movielens-1m` into COLDWARM_CACHE_DIR, then train
#      on the extracted directory; any other value (synthetic[:N], a mounted directory or file) is used as is;
#   2. `coldwarm run --no-serve` (train -> evaluate -> export -> index), SKIPPED when the artifacts root
#      already holds a complete version (LATEST and its index), unless COLDWARM_RETRAIN=1; a model exported
#      without its index gets only `coldwarm build-index`;
#   3. `coldwarm load-features` into COLDWARM_REDIS_URL, when this run trained, when the store holds no
#      completed load (no load marker: Redis runs without persistence by default, so a restarted Redis
#      is empty), or when COLDWARM_RELOAD_FEATURES=1. Loading is authoritative for the users it loads, so it is not repeated
#      over a live store: that would drop the events recorded since.
# Exit status 0 means the artifacts and the features are ready, which is what the api waits for
# (depends_on: condition: service_completed_successfully).
set -eu

log() { printf 'coldwarm-trainer: %s\n' "$*" >&2; }
is_true() { case "$1" in 1 | [Tt]rue | TRUE | [Yy]es | YES) return 0 ;; *) return 1 ;; esac; }

: "${COLDWARM_DATA:=synthetic}"
: "${COLDWARM_ARTIFACTS_DIR:=artifacts}"
: "${COLDWARM_RUN_DIR:=runs/latest}"
: "${COLDWARM_RETRAIN:=0}"
: "${COLDWARM_RELOAD_FEATURES:=0}"
: "${COLDWARM_EVAL_MODELS:=}"
: "${COLDWARM_USERS_FILE:=}"
: "${COLDWARM_ITEMS_FILE:=}"
export COLDWARM_ARTIFACTS_DIR

data="$COLDWARM_DATA"
if [ "$data" = "movielens-1m" ]; then
    : "${COLDWARM_CACHE_DIR:=cache}"
    export COLDWARM_CACHE_DIR
    coldwarm data fetch movielens-1m
    data="$COLDWARM_CACHE_DIR/ml-1m"
fi

# --users/--items of a CSV/Parquet interactions file, for `run` and `load-features` alike.
set --
if [ -n "$COLDWARM_USERS_FILE" ]; then set -- "$@" --users "$COLDWARM_USERS_FILE"; fi
if [ -n "$COLDWARM_ITEMS_FILE" ]; then set -- "$@" --items "$COLDWARM_ITEMS_FILE"; fi

model_version=""
if [ -s "$COLDWARM_ARTIFACTS_DIR/LATEST" ]; then
    model_version=$(tr -d '[:space:]' < "$COLDWARM_ARTIFACTS_DIR/LATEST")
fi
version_dir="$COLDWARM_ARTIFACTS_DIR/$model_version"

trained=0
if is_true "$COLDWARM_RETRAIN" || [ -z "$model_version" ] || [ ! -d "$version_dir" ]; then
    log "training on $data (COLDWARM_RETRAIN=$COLDWARM_RETRAIN, artifacts in $COLDWARM_ARTIFACTS_DIR)"
    if [ -n "$COLDWARM_EVAL_MODELS" ]; then
        coldwarm run --data "$data" "$@" --run-dir "$COLDWARM_RUN_DIR" --models "$COLDWARM_EVAL_MODELS" \
            --no-serve
    else
        coldwarm run --data "$data" "$@" --run-dir "$COLDWARM_RUN_DIR" --no-serve
    fi
    trained=1
elif [ ! -s "$version_dir/index/LATEST" ]; then
    log "model $model_version has no index yet: building it"
    coldwarm build-index --data "$data"
else
    log "artifacts $model_version are complete: not retraining (COLDWARM_RETRAIN=1 forces it)"
fi

# "empty" or "loaded": whether the feature store holds a completed load (its load marker; Redis runs
# without persistence by default, so a restarted Redis has none). Waits up to COLDWARM_STORE_WAIT_S
# (120) for the store to answer (a Redis Cluster: formed and serving every slot), since the cluster
# profile's nodes may still be joining; fails, and so does this script, when it never does.
features_state() {
    python - <<'PY'
import os
import sys
import time

from redis.exceptions import RedisClusterException, RedisError

from service.feature_store import KeyLayout
from service.feature_store.client import create_sync_client
from service.settings import ServiceSettings, redacted_url

settings = ServiceSettings()
marker_key = KeyLayout(settings.key_prefix, settings.key_schema_version).load_marker_key()
deadline = time.monotonic() + float(os.environ.get("COLDWARM_STORE_WAIT_S", "120"))
while True:
    try:
        client = create_sync_client(settings.redis_url, settings.redis_cluster)
        print("loaded" if client.exists(marker_key) else "empty")
        break
    except (RedisError, RedisClusterException) as error:
        if time.monotonic() > deadline:
            sys.exit(f"coldwarm-trainer: {redacted_url(settings.redis_url)} does not answer: {error}")
        time.sleep(2)
PY
}

if [ -z "${COLDWARM_REDIS_URL:-}" ]; then
    log "COLDWARM_REDIS_URL is not set: no features to load"
else
    state=$(features_state)
    if [ "$trained" = "1" ] || is_true "$COLDWARM_RELOAD_FEATURES" || [ "$state" = "empty" ]; then
        coldwarm load-features --data "$data" "$@"
    else
        log "features already in Redis: not reloading them (COLDWARM_RELOAD_FEATURES=1 forces it)"
    fi
fi
log "done"
