#!/usr/bin/env bash
# Stops the training on every worker and frees the TPU devices.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_FLAGS="--now --grace: --no-marker"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [flags] [--now] [--grace SECONDS] [--no-marker]

On every worker: sends SIGTERM to the memjax training process (memjax then finishes its step, saves a
checkpoint and exits), waits up to --grace seconds (default 120) for it to go, then SIGKILLs whatever
is left, kills every process still holding /dev/accel* or /dev/vfio/* (the TPU chips) and removes
/tmp/libtpu_lockfile, so the next launch finds the chips free. Also leaves a marker
(REMOTE_LOG_DIR/RUN_NAME.killed) that tells babysit.sh the stop was deliberate: it then exits instead
of relaunching. Stop babysit.sh before killing a run you do not want restarted.

  --now           skip the graceful SIGTERM wait (no final checkpoint)
  --grace N       seconds to wait after SIGTERM (default 120)
  --no-marker     do not leave the marker (babysit.sh uses this before a relaunch)

Needs TPU_NAME, TPU_ZONE, TPU_PROJECT (RUN_NAME defaults to TPU_NAME).

$COMMON_FLAGS_HELP
EOF
}

parse_flags "$@"
finalize_settings
require TPU_NAME TPU_ZONE TPU_PROJECT RUN_NAME REMOTE_LOG_DIR

grace=$(extra_flag --grace 120)
[[ $(extra_flag --now) != 1 ]] || grace=0
[[ $grace =~ ^[0-9]+$ ]] || usage_error "--grace takes a number of seconds, got '$grace'"
logs=$(remote_path "$REMOTE_LOG_DIR")

# The pattern matches the python process only ("<...>python -m memjax.train ..."): not the worker.sh
# wrapper, which must live on to record the exit status, nor this ssh command's own shell.
pattern="'^[^ ]*python[0-9.]* -m memjax[.]train'"
steps=()
[[ $(extra_flag --no-marker) == 1 ]] ||
    steps+=("mkdir -p \"$logs\" && touch \"$logs/$RUN_NAME.killed\"")
if ((grace > 0)); then
    steps+=("pkill -TERM -f $pattern || true"
        "for _ in \$(seq $grace); do pgrep -f $pattern >/dev/null || break; sleep 1; done")
fi
steps+=("pkill -KILL -f $pattern || true"
    "sleep 1"
    "sudo -n lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo -n kill -9 || true"
    "sudo -n rm -f /tmp/libtpu_lockfile || true"
    "echo \"memjax-kill: \$(hostname) stopped\"")
command=""
for step in "${steps[@]}"; do command+="${command:+; }$step"; done

log "stopping run $RUN_NAME on every worker of $TPU_NAME"
tpu_ssh all "$command"
