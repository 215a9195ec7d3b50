#!/usr/bin/env bash
# Keeps a run going: recreates a preempted TPU and relaunches a training process that died.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BABYSIT_INTERVAL="${BABYSIT_INTERVAL:-300}"              # seconds between checks
BABYSIT_MAX_ITERATIONS="${BABYSIT_MAX_ITERATIONS:-}"     # stop after this many checks (0 = never; dry-run: 1)
BABYSIT_MAX_RELAUNCHES="${BABYSIT_MAX_RELAUNCHES:-5}"    # relaunches in a row without seeing the job run
BABYSIT_STALL_SECONDS="${BABYSIT_STALL_SECONDS:-3600}"   # a log silent this long means a hung job (0 = off)
BABYSIT_DELETE_WHEN_DONE="${BABYSIT_DELETE_WHEN_DONE:-0}"  # 1: delete the TPU once training finished

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [flags] [--config.a.b=VALUE ...]

Every BABYSIT_INTERVAL seconds (default 300):
  1. reads the queued resource's state (and the TPU node's). PREEMPTED, SUSPENDING, SUSPENDED, FAILED,
     TERMINATED or a missing TPU: delete.sh --yes, create.sh, sync.sh, setup.sh, launch.sh (with the
     overrides given here); the run resumes from its newest checkpoint in the bucket. While a request
     waits in the queue or is provisioning, it waits.
  2. on a healthy TPU, asks every worker for the job's state (worker.sh status):
       all RUNNING                  nothing to do
       all FINISHED                 training is over: exits 0 (BABYSIT_DELETE_WHEN_DONE=1 deletes the TPU)
       KILLED (kill.sh)             a deliberate stop: exits 0 without relaunching
       FAILED / DEAD / NONE / SIGNALLED on a worker and nothing running, a FAILED/DEAD/NONE worker next
       to running ones, or a log silent for BABYSIT_STALL_SECONDS (default 3600; 0 = off):
                                    kill.sh --no-marker, then launch.sh
     Gives up (exit 1) after BABYSIT_MAX_RELAUNCHES (default 5) relaunches in a row without the job
     being seen running at a later check: a run that dies at start-up needs a person.

"Finished" is the exit record worker.sh writes: exit code 0, without memjax's "stopped by SIGTERM at
step N" line (that one is a graceful stop, resumed by a relaunch).

BABYSIT_MAX_ITERATIONS=N stops after N checks (default: never; in dry-run 1).
Dry-run simulation: TPU_FAKE_STATE (queued resource, default ACTIVE), TPU_FAKE_NODE_STATE (TPU node),
TPU_FAKE_JOB (comma-separated worker.sh states: entry i for worker i, the last one for the workers
after it, "-" for a worker that does not answer; default RUNNING). A dry run that "recreates" the TPU
updates them as the real world would (MISSING after delete, ACTIVE after create, and after a launch
TPU_FAKE_JOB_AFTER_LAUNCH, default RUNNING), so BABYSIT_MAX_ITERATIONS=2 shows the check after it.

Needs what create.sh and launch.sh need: TPU_NAME, TPU_ZONE, TPU_PROJECT, TPU_TYPE, TPU_BUCKET,
TRAIN_CONFIG.

$COMMON_FLAGS_HELP
EOF
}

parse_flags "$@"
finalize_settings
needed=(TPU_NAME TPU_ZONE TPU_PROJECT TPU_TYPE TPU_RUNTIME TRAIN_CONFIG)
[[ -n $TRAIN_CHECKPOINT_DIR ]] || needed+=(TPU_BUCKET)
require "${needed[@]}"
[[ -n $BABYSIT_MAX_ITERATIONS ]] || { if dry_run; then BABYSIT_MAX_ITERATIONS=1; else BABYSIT_MAX_ITERATIONS=0; fi; }
for setting in BABYSIT_INTERVAL BABYSIT_MAX_ITERATIONS BABYSIT_MAX_RELAUNCHES BABYSIT_STALL_SECONDS; do
    [[ ${!setting} =~ ^[0-9]+$ ]] || die "$setting must be a whole number, got '${!setting}'"
done

# The overrides travel as arguments; clearing TRAIN_OVERRIDES keeps launch.sh from adding them twice.
export TRAIN_OVERRIDES=""
step() {
    local script=$1
    shift
    log "running $script${*:+ $*}"
    "$TPU_SCRIPTS_DIR/$script" "$@"
}

# ---- TPU health --------------------------------------------------------------------------------------
# check_tpu: sets TPU_HEALTH to OK, BROKEN (recreate) or WAIT, and TPU_DETAIL.
check_tpu() {
    query_qr_state ACTIVE
    TPU_DETAIL="queued resource $QR_STATE"
    case $QR_STATE in
    ACTIVE | MISSING)
        query_node_state
        TPU_DETAIL+=", node $NODE_STATE"
        case $NODE_STATE in
        READY) TPU_HEALTH=OK ;;
        MISSING) TPU_HEALTH=BROKEN ;;
        PREEMPTED | TERMINATED | STOPPED | STOPPING) TPU_HEALTH=BROKEN ;;
        *) TPU_HEALTH=WAIT ;;  # CREATING, STARTING, REPAIRING, RESTARTING, UNKNOWN ...
        esac
        ;;
    PREEMPTED | SUSPENDING | SUSPENDED | FAILED) TPU_HEALTH=BROKEN ;;
    *) TPU_HEALTH=WAIT ;;  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, CREATING, DELETING, UNKNOWN
    esac
}

# ---- job state ---------------------------------------------------------------------------------------
# summarize STATE...: sets JOB_STATE (RUNNING, FINISHED, KILLED, WAIT, RELAUNCH, UNKNOWN) from the
# workers' worker.sh states, and JOB_DETAIL.
summarize() {
    local n=$# running=0 finished=0 killed=0 signalled=0 broken=0 stalled=0 s
    local -A count=()
    local -a order=()
    for s; do
        [[ -n ${count[$s]:-} ]] || order+=("$s")
        count[$s]=$((${count[$s]:-0} + 1))
    done
    JOB_DETAIL="$n workers:"
    for s in ${order[@]+"${order[@]}"}; do JOB_DETAIL+=" ${count[$s]} $s"; done
    for s; do
        case $s in
        RUNNING) running=$((running + 1)) ;;
        FINISHED) finished=$((finished + 1)) ;;
        KILLED) killed=$((killed + 1)) ;;
        SIGNALLED) signalled=$((signalled + 1)) ;;
        STALLED) stalled=$((stalled + 1)) ;;
        *) broken=$((broken + 1)) ;;  # FAILED, DEAD, NONE
        esac
    done
    if ((n == 0)); then
        JOB_STATE=UNKNOWN JOB_DETAIL="no worker answered"
    elif [[ -n $TPU_WORKERS ]] && ((n < TPU_WORKERS)); then
        JOB_STATE=UNKNOWN JOB_DETAIL="only $n of $TPU_WORKERS workers answered"
    elif ((killed)); then
        JOB_STATE=KILLED
    elif ((finished == n)); then
        JOB_STATE=FINISHED
    elif ((stalled)); then
        JOB_STATE=RELAUNCH JOB_DETAIL+=", STALLED = log silent for over $BABYSIT_STALL_SECONDS s"
    elif ((running == n)); then
        JOB_STATE=RUNNING
    elif ((running && !broken)); then
        JOB_STATE=WAIT  # some exited cleanly while others still save or finish
    else
        JOB_STATE=RELAUNCH
    fi
}

check_job() {
    local status_cmd out states=() line
    status_cmd="bash \"$(remote_path "$REMOTE_REPO_DIR")/tpu_scripts/worker.sh\" status --run $(shell_quote "$RUN_NAME")"
    status_cmd+=" --log-dir \"$(remote_path "$REMOTE_LOG_DIR")\" --stall-seconds $BABYSIT_STALL_SECONDS"
    if dry_run; then
        tpu_ssh all "$status_cmd"
        # Entry i is worker i's state, the last entry stands for the workers after it, "-" = no answer.
        local -a fake
        local i
        IFS=',' read -ra fake <<<"${TPU_FAKE_JOB:-RUNNING}"
        for ((i = 0; i < ${TPU_WORKERS:-${#fake[@]}} || i < ${#fake[@]}; i++)); do
            line=${fake[i < ${#fake[@]} ? i : ${#fake[@]} - 1]}
            [[ $line == - ]] || states+=("${line%% *}")
        done
    else
        out=$(tpu_ssh all "$status_cmd" 2>&1) || log "status check: ssh reported an error"
        while IFS= read -r line; do
            [[ $line =~ memjax-job:\ ([A-Z]+) ]] && states+=("${BASH_REMATCH[1]}")
        done <<<"$out"
    fi
    summarize ${states[@]+"${states[@]}"}
}

# ---- actions -----------------------------------------------------------------------------------------
PREPARE_PENDING=0  # the TPU was recreated but sync/setup/launch did not all succeed yet

prepare_and_launch() {
    step sync.sh && step setup.sh && step launch.sh ${OVERRIDES[@]+"${OVERRIDES[@]}"} || return 1
    ! dry_run || export TPU_FAKE_JOB="${TPU_FAKE_JOB_AFTER_LAUNCH:-RUNNING}"
}

recover() {
    if [[ $QR_STATE != MISSING || $NODE_STATE != MISSING ]]; then
        step delete.sh --yes || return 1
        ! dry_run || export TPU_FAKE_STATE=MISSING TPU_FAKE_NODE_STATE=MISSING
    fi
    step create.sh || return 1
    ! dry_run || export TPU_FAKE_STATE=ACTIVE TPU_FAKE_NODE_STATE=READY TPU_FAKE_JOB=NONE
    PREPARE_PENDING=1
    prepare_and_launch || return 1
    PREPARE_PENDING=0
}

relaunch() {
    step kill.sh --no-marker && step launch.sh ${OVERRIDES[@]+"${OVERRIDES[@]}"} || return 1
    ! dry_run || export TPU_FAKE_JOB="${TPU_FAKE_JOB_AFTER_LAUNCH:-RUNNING}"
}

# ---- the loop ----------------------------------------------------------------------------------------
log "watching run $RUN_NAME on $TPU_NAME ($TPU_TYPE, $TPU_ZONE) every $BABYSIT_INTERVAL s"
iteration=0
relaunches=0  # in a row, without the job seen running in between
while :; do
    iteration=$((iteration + 1))
    QR_STATE="" NODE_STATE=""
    check_tpu
    case $TPU_HEALTH in
    BROKEN)
        log "TPU needs recreating ($TPU_DETAIL): delete, create, sync, setup, launch"
        if recover; then
            log "recreated and relaunched; training resumes from the newest checkpoint in $TRAIN_CHECKPOINT_DIR"
        else
            log "recovery did not complete; trying again at the next check"
        fi
        ;;
    WAIT) log "TPU not ready ($TPU_DETAIL); waiting" ;;
    OK)
        if ((PREPARE_PENDING)); then
            log "finishing the preparation of the recreated TPU"
            if prepare_and_launch; then PREPARE_PENDING=0; else log "preparation failed; trying again at the next check"; fi
        else
            check_job
            case $JOB_STATE in
            RUNNING)
                relaunches=0
                log "training is running ($JOB_DETAIL)"
                ;;
            FINISHED)
                log "training finished on every worker"
                if [[ $BABYSIT_DELETE_WHEN_DONE == 1 ]]; then
                    step delete.sh --yes
                fi
                exit 0
                ;;
            KILLED)
                log "the run was stopped with kill.sh; not relaunching"
                exit 0
                ;;
            WAIT | UNKNOWN) log "job state $JOB_STATE ($JOB_DETAIL); checking again later" ;;
            RELAUNCH)
                if ((relaunches >= BABYSIT_MAX_RELAUNCHES)); then
                    die "the job stopped again ($JOB_DETAIL) after $relaunches relaunches in a row without being seen running (BABYSIT_MAX_RELAUNCHES); look at tpu_scripts/logs.sh --worker all"
                fi
                relaunches=$((relaunches + 1))
                log "the job is not running ($JOB_DETAIL): relaunch $relaunches of at most $BABYSIT_MAX_RELAUNCHES in a row"
                relaunch || log "relaunch did not complete; trying again at the next check"
                ;;
            esac
        fi
        ;;
    esac
    if ((BABYSIT_MAX_ITERATIONS > 0 && iteration >= BABYSIT_MAX_ITERATIONS)); then
        log "stopping after $iteration checks (BABYSIT_MAX_ITERATIONS)"
        exit 0
    fi
    nap "$BABYSIT_INTERVAL"
done
