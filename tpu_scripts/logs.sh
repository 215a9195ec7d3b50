#!/usr/bin/env bash
# Shows (or fetches) the training log of one worker or of all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_FLAGS="--worker: --lines: --follow -f --fetch: --status"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [flags] [--worker N|all] [--lines N] [--follow] [--fetch DIR] [--status]

Prints the end of REMOTE_LOG_DIR/RUN_NAME.log (default memjax-logs/RUN_NAME.log) from a worker.

  --worker N|all   which worker (default 0, the one that writes metrics); with 'all' every line is
                   prefixed with the worker's hostname
  --lines N        how many lines (default 50)
  --follow, -f     keep printing as the log grows (Ctrl-C to stop; the training goes on)
  --fetch DIR      copy the whole log file(s) to DIR/RUN_NAME.worker-N.log instead (gcloud scp);
                   with --worker all it needs the worker count: TPU_WORKERS or TPU_TYPE
  --status         print each worker's job state (RUNNING, FINISHED, FAILED ...) instead

Needs TPU_NAME, TPU_ZONE, TPU_PROJECT (RUN_NAME defaults to TPU_NAME).

$COMMON_FLAGS_HELP
EOF
}

parse_flags "$@"
finalize_settings
require TPU_NAME TPU_ZONE TPU_PROJECT RUN_NAME REMOTE_LOG_DIR

worker=$(extra_flag --worker 0)
lines=$(extra_flag --lines 50)
follow=$(extra_flag --follow)
[[ -n $follow ]] || follow=$(extra_flag -f)
fetch=$(extra_flag --fetch)
[[ $worker == all || $worker =~ ^[0-9]+$ ]] || usage_error "--worker takes a number or 'all', got '$worker'"
[[ $lines =~ ^[0-9]+$ ]] || usage_error "--lines takes a number, got '$lines'"

logs=$(remote_path "$REMOTE_LOG_DIR")
log_file="$logs/$RUN_NAME.log"

if [[ $(extra_flag --status) == 1 ]]; then
    tpu_ssh "$worker" "bash \"$(remote_path "$REMOTE_REPO_DIR")/tpu_scripts/worker.sh\" status --run $(shell_quote "$RUN_NAME") --log-dir \"$logs\" | sed \"s/^/\$(hostname): /\""
    exit 0
fi

if [[ -n $fetch ]]; then
    if [[ $worker == all ]]; then
        [[ -n $TPU_WORKERS ]] || die "--fetch with --worker all needs TPU_WORKERS (or a TPU_TYPE it can be derived from)"
        workers=$(seq 0 $((TPU_WORKERS - 1)))
    else
        workers=$worker
    fi
    run mkdir -p "$fetch"
    remote_log="$REMOTE_LOG_DIR/$RUN_NAME.log"  # scp reads relative paths from the home directory
    for w in $workers; do
        gc compute tpus tpu-vm scp "$TPU_NAME:$remote_log" "$fetch/$RUN_NAME.worker-$w.log" "${LOC[@]}" \
            --worker="$w" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --quiet
    done
    exit 0
fi

# tqdm redraws its bar with carriage returns: show each redraw as its own line.
show="stdbuf -oL tr '\\r' '\\n'"
[[ $worker != all ]] || show+=" | sed -u \"s/^/\$(hostname): /\""
if [[ $follow == 1 ]]; then
    tpu_ssh "$worker" "tail -n $lines -F \"$log_file\" | $show"
else
    tpu_ssh "$worker" "if test -f \"$log_file\"; then tail -n $lines \"$log_file\" | $show | tail -n $lines; else echo \"no log $log_file on \$(hostname)\"; fi"
fi
