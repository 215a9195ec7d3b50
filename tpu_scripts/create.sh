#!/usr/bin/env bash
# Creates the TPU through a queued resource and waits until it is ACTIVE, retrying with backoff.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CREATE_ATTEMPTS="${CREATE_ATTEMPTS:-5}"       # create requests before giving up
CREATE_BACKOFF="${CREATE_BACKOFF:-60}"        # seconds before the 2nd attempt; doubles each time
CREATE_BACKOFF_MAX="${CREATE_BACKOFF_MAX:-1800}"
CREATE_POLL="${CREATE_POLL:-30}"              # seconds between state checks while waiting
CREATE_WAIT_TIMEOUT="${CREATE_WAIT_TIMEOUT:-0}"  # give up on one request after this long (0 = never)

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [flags]

Requests the TPU as a queued resource (gcloud compute tpus queued-resources create), waits until the
request is ACTIVE, and on failure (FAILED/SUSPENDED, or the create call failing) deletes the request
and tries again after a backoff. Does nothing if the queued resource is already ACTIVE.

Needs TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_TYPE (TPU_RUNTIME has a default for v4/v5e/v5p/v6e).
Retry settings: CREATE_ATTEMPTS=$CREATE_ATTEMPTS, CREATE_BACKOFF=$CREATE_BACKOFF s (doubling, at most
CREATE_BACKOFF_MAX=$CREATE_BACKOFF_MAX s), CREATE_POLL=$CREATE_POLL s, CREATE_WAIT_TIMEOUT=$CREATE_WAIT_TIMEOUT s (0 = wait
as long as the queue takes). Extra gcloud flags (network, service account, scopes): TPU_CREATE_FLAGS.
Dry-run simulation: TPU_FAKE_STATE (state before creating, default MISSING) and
TPU_FAKE_CREATE_RESULT (comma-separated state each attempt ends in, default ACTIVE).

$COMMON_FLAGS_HELP
EOF
}

parse_flags "$@"
finalize_settings
require TPU_NAME TPU_ZONE TPU_PROJECT TPU_TYPE TPU_RUNTIME
for setting in CREATE_ATTEMPTS CREATE_BACKOFF CREATE_BACKOFF_MAX CREATE_POLL CREATE_WAIT_TIMEOUT; do
    [[ ${!setting} =~ ^[0-9]+$ ]] || die "$setting must be a whole number, got '${!setting}'"
done
((CREATE_ATTEMPTS >= 1)) || die "CREATE_ATTEMPTS must be at least 1"

create_request() {
    local -a cmd extra
    cmd=(compute tpus queued-resources create "$TPU_QR_ID" --node-id="$TPU_NAME" "${LOC[@]}"
        --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME")
    [[ $TPU_SPOT != 1 ]] || cmd+=(--spot)
    [[ $TPU_RESERVED != 1 ]] || cmd+=(--reserved)
    read -ra extra <<<"$TPU_CREATE_FLAGS"
    gc "${cmd[@]}" ${extra[@]+"${extra[@]}"} --quiet
}

delete_request() {
    gc compute tpus queued-resources delete "$TPU_QR_ID" "${LOC[@]}" --force --quiet
}

fake_results=()
IFS=',' read -ra fake_results <<<"${TPU_FAKE_CREATE_RESULT:-ACTIVE}"

# wait_active ATTEMPT: 0 once ACTIVE, 1 if the request failed or timed out.
wait_active() {
    local attempt=$1 start=$SECONDS
    if dry_run; then
        query_qr_state
        local i=$((attempt - 1))
        ((i < ${#fake_results[@]})) || i=$((${#fake_results[@]} - 1))
        QR_STATE=${fake_results[$i]}
        log "simulated state after attempt $attempt: $QR_STATE"
        [[ $QR_STATE == ACTIVE ]]
        return
    fi
    while :; do
        query_qr_state
        case $QR_STATE in
        ACTIVE) return 0 ;;
        FAILED | SUSPENDING | SUSPENDED | MISSING) log "queued resource $TPU_QR_ID is $QR_STATE"; return 1 ;;
        *) log "queued resource $TPU_QR_ID: $QR_STATE (waited $((SECONDS - start)) s)" ;;
        esac
        if ((CREATE_WAIT_TIMEOUT > 0 && SECONDS - start > CREATE_WAIT_TIMEOUT)); then
            log "still not ACTIVE after $CREATE_WAIT_TIMEOUT s (CREATE_WAIT_TIMEOUT)"
            return 1
        fi
        sleep "$CREATE_POLL"
    done
}

query_qr_state MISSING
log "queued resource $TPU_QR_ID (TPU $TPU_NAME, $TPU_TYPE, $TPU_ZONE): $QR_STATE"
need_create=1
case $QR_STATE in
ACTIVE) log "already ACTIVE; nothing to do"; exit 0 ;;
MISSING) ;;
FAILED | SUSPENDING | SUSPENDED) log "removing the $QR_STATE request first"; delete_request ;;
UNKNOWN) die "could not read the state of queued resource $TPU_QR_ID" ;;
*) log "a request is already in the queue; waiting for it"; need_create=0 ;;
esac

backoff=$CREATE_BACKOFF
for ((attempt = 1; attempt <= CREATE_ATTEMPTS; attempt++)); do
    if ((need_create == 0)) || create_request; then
        if wait_active "$attempt"; then
            log "queued resource $TPU_QR_ID is ACTIVE: TPU $TPU_NAME is ready"
            exit 0
        fi
        delete_request || log "deleting $TPU_QR_ID failed; trying to create anyway"
    else
        log "the create request failed (attempt $attempt of $CREATE_ATTEMPTS)"
        query_qr_state MISSING
        [[ $QR_STATE == MISSING ]] || delete_request || log "deleting $TPU_QR_ID failed; trying to create anyway"
    fi
    need_create=1
    if ((attempt < CREATE_ATTEMPTS)); then
        log "attempt $attempt of $CREATE_ATTEMPTS failed; retrying in $backoff s"
        nap "$backoff"
        backoff=$((backoff * 2 > CREATE_BACKOFF_MAX ? CREATE_BACKOFF_MAX : backoff * 2))
    fi
done
die "TPU $TPU_NAME is not ACTIVE after $CREATE_ATTEMPTS attempts (CREATE_ATTEMPTS)"
