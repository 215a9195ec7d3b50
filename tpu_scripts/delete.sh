#!/usr/bin/env bash
# Deletes the queued resource and its TPU (or a TPU made without a queued resource).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [flags] [--yes]

Deletes the queued resource TPU_QR_ID together with its TPU (queued-resources delete --force); if
there is no queued resource but a TPU named TPU_NAME exists, deletes that TPU (tpu-vm delete). Asks
for confirmation first unless --yes (or ASSUME_YES=1). The checkpoints in the bucket stay; the
workers' disks (logs, TRAIN_WORKDIR) go with the TPU: fetch what you need first (logs.sh --fetch).
Dry-run simulation: TPU_FAKE_STATE (default ACTIVE), TPU_FAKE_NODE_STATE.

Needs TPU_NAME, TPU_ZONE, TPU_PROJECT.

$COMMON_FLAGS_HELP
EOF
}

parse_flags "$@"
finalize_settings
require TPU_NAME TPU_ZONE TPU_PROJECT TPU_QR_ID

if [[ $ASSUME_YES != 1 ]] && ! dry_run; then
    answer=""
    read -r -p "Delete queued resource $TPU_QR_ID and TPU $TPU_NAME (project $TPU_PROJECT, zone $TPU_ZONE)? [y/N] " answer || true
    [[ $answer == y || $answer == Y || $answer == yes ]] || die "not deleted (answer y, or pass --yes)"
fi

query_qr_state ACTIVE
case $QR_STATE in
MISSING)
    query_node_state
    case $NODE_STATE in
    MISSING) log "no queued resource $TPU_QR_ID and no TPU $TPU_NAME: nothing to delete" ;;
    UNKNOWN) die "could not read the state of TPU $TPU_NAME" ;;
    *)
        log "no queued resource $TPU_QR_ID; deleting TPU $TPU_NAME ($NODE_STATE)"
        gc compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}" --quiet
        ;;
    esac
    ;;
UNKNOWN) die "could not read the state of queued resource $TPU_QR_ID" ;;
*)
    log "deleting queued resource $TPU_QR_ID ($QR_STATE) and TPU $TPU_NAME"
    gc compute tpus queued-resources delete "$TPU_QR_ID" "${LOC[@]}" --force --quiet
    ;;
esac
