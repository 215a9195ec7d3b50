#!/usr/bin/env bash
# Starts `python -m memjax.train` on every worker, detached, one log file per worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [flags] [--config.a.b=VALUE ...]

On every worker (gcloud compute tpus tpu-vm ssh --worker=all) starts, detached from the ssh session:

  REMOTE_VENV_DIR/bin/python -m memjax.train --config TRAIN_CONFIG --workdir TRAIN_WORKDIR \\
      --config.train.checkpoint_dir=TPU_BUCKET/RUN_NAME [TRAIN_OVERRIDES] [--config.a.b=VALUE ...]

in REMOTE_REPO_DIR, with its output appended to REMOTE_LOG_DIR/RUN_NAME.log (default
memjax-logs/RUN_NAME.log under each worker's home; see logs.sh). Every worker runs the same command:
memjax joins the hosts of a pod by itself (mesh.distributed = "auto"). The checkpoints go to the bucket,
and a launch resumes from the newest one there, so launching again after a stop or a preemption
continues the run. When the process ends, its exit code goes to REMOTE_LOG_DIR/RUN_NAME.exit (read by
babysit.sh). Refuses to start on a worker where the run is still going (stop it with kill.sh).

Needs TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_BUCKET (or TRAIN_CHECKPOINT_DIR), TRAIN_CONFIG.
TRAIN_ENV='K=V ...' sets environment variables for the training process (e.g. LIBTPU_INIT_ARGS=...).
Overrides need the '=' form.

$COMMON_FLAGS_HELP
EOF
}

parse_flags "$@"
finalize_settings
needed=(TPU_NAME TPU_ZONE TPU_PROJECT TRAIN_CONFIG)
[[ -n $TRAIN_CHECKPOINT_DIR ]] || needed+=(TPU_BUCKET)  # the checkpoints go to TPU_BUCKET/RUN_NAME
require "${needed[@]}"

repo=$(remote_path "$REMOTE_REPO_DIR")
venv=$(remote_path "$REMOTE_VENV_DIR")
logs=$(remote_path "$REMOTE_LOG_DIR")
workdir=$(remote_path "$TRAIN_WORKDIR")

env_part=""
read -ra env_pairs <<<"$TRAIN_ENV"
for pair in ${env_pairs[@]+"${env_pairs[@]}"}; do
    [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "TRAIN_ENV: '$pair' is not KEY=VALUE"
    env_part+="$(shell_quote "$pair") "
done
[[ -z $env_part ]] || env_part="env $env_part"

# The paths expand on the worker ("$HOME/..."); everything else is quoted for the worker's shell.
command_line="$env_part\"$venv/bin/python\" -m memjax.train --config $(shell_quote "$TRAIN_CONFIG")"
command_line+=" --workdir \"$workdir\" $(quote_words --config.train.checkpoint_dir="$TRAIN_CHECKPOINT_DIR" \
    ${OVERRIDES[@]+"${OVERRIDES[@]}"})"

remote="mkdir -p \"$workdir\" && bash \"$repo/tpu_scripts/worker.sh\" start --run $(shell_quote "$RUN_NAME")"
remote+=" --log-dir \"$logs\" --cwd \"$repo\" -- $command_line"

log "launching run $RUN_NAME on every worker of $TPU_NAME (checkpoints: $TRAIN_CHECKPOINT_DIR)"
tpu_ssh all "$remote"
log "started; follow it with: tpu_scripts/logs.sh --follow"
