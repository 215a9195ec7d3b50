#!/usr/bin/env bash
# Runs on each TPU worker (launch.sh, logs.sh and babysit.sh call it over ssh): starts the training
# process detached from the ssh session, records how it ended, and reports its state.
#
#   worker.sh start  --run RUN --log-dir DIR [--cwd DIR] -- COMMAND...
#   worker.sh status --run RUN --log-dir DIR [--stall-seconds N]
#
# Files in DIR: RUN.log (the process's output, appended launch after launch), RUN.pid (the wrapper
# that waits for it), RUN.exit ("<exit code> finished|signalled|failed", written when it ends),
# RUN.killed (written by kill.sh: a deliberate stop, not to be relaunched).
#
# status prints one line "memjax-job: STATE [detail]" with STATE one of
#   RUNNING    the process is alive (detail: seconds since the log last grew)
#   STALLED    alive, but the log has not grown for more than --stall-seconds (0 = never stalled)
#   FINISHED   exited 0 (trained to train.steps, or stopped at train.stop_at_step)
#   SIGNALLED  exited 0 after SIGTERM/SIGINT: memjax saved a checkpoint; a relaunch resumes
#   FAILED     exited non-zero (detail: the exit code)
#   KILLED     stopped by kill.sh
#   DEAD       a wrapper was started but vanished without an exit record (reboot, OOM kill)
#   NONE       never launched here
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"
}

die() { echo "worker.sh: error: $*" >&2; exit 2; }

action=${1:-}
[[ -n $action ]] || { usage >&2; exit 2; }
shift
case $action in -h | --help) usage; exit 0 ;; esac

run="" log_dir="" cwd="" stall=0
while (($#)); do
    case $1 in
    --run) run=${2:?--run needs a value}; shift 2 ;;
    --log-dir) log_dir=${2:?--log-dir needs a value}; shift 2 ;;
    --cwd) cwd=${2:?--cwd needs a value}; shift 2 ;;
    --stall-seconds) stall=${2:?--stall-seconds needs a value}; shift 2 ;;
    --) shift; break ;;
    *) die "unexpected argument '$1'" ;;
    esac
done
[[ -n $run && -n $log_dir ]] || die "--run and --log-dir are required"
[[ $run =~ ^[A-Za-z0-9._-]+$ ]] || die "bad run name '$run'"
[[ $stall =~ ^[0-9]+$ ]] || die "--stall-seconds must be a whole number"

log_file="$log_dir/$run.log"
pid_file="$log_dir/$run.pid"
exit_file="$log_dir/$run.exit"
killed_file="$log_dir/$run.killed"

wrapper_alive() {
    local pid
    [[ -f $pid_file ]] || return 1
    pid=$(<"$pid_file")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "worker.sh _run"
}

status() {
    local code outcome age now mtime
    if [[ -f $killed_file ]]; then
        echo "memjax-job: KILLED"
    elif [[ -f $exit_file ]]; then
        read -r code outcome <"$exit_file" || true
        case $outcome in
        finished) echo "memjax-job: FINISHED" ;;
        signalled) echo "memjax-job: SIGNALLED" ;;
        *) echo "memjax-job: FAILED ${code:-?}" ;;
        esac
    elif wrapper_alive; then
        now=$(date +%s)
        mtime=$(stat -c %Y "$log_file" 2>/dev/null || echo "$now")
        age=$((now - mtime))
        if ((stall > 0 && age > stall)); then
            echo "memjax-job: STALLED $age"
        else
            echo "memjax-job: RUNNING $age"
        fi
    elif [[ -f $pid_file ]]; then
        echo "memjax-job: DEAD"
    else
        echo "memjax-job: NONE"
    fi
}

start() {
    (($#)) || die "start needs the command after --"
    mkdir -p "$log_dir"
    if wrapper_alive && [[ ! -f $exit_file ]]; then
        die "run $run is already running here (pid $(<"$pid_file")); stop it with tpu_scripts/kill.sh first"
    fi
    rm -f "$exit_file" "$killed_file"
    printf '==== memjax launch %s on %s: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$(hostname)" "$*" >>"$log_file"
    # setsid: out of the ssh session's process group, so closing ssh leaves the run alone.
    setsid nohup bash "$SELF" _run --run "$run" --log-dir "$log_dir" --cwd "${cwd:-$PWD}" -- "$@" \
        </dev/null >/dev/null 2>&1 &
    echo "$!" >"$pid_file"
    echo "memjax-start: $(hostname) pid $! log $log_file"
}

_run() {
    local offset code outcome
    echo "$$" >"$pid_file"
    # A SIGTERM meant for the training process must not take its wrapper down before the exit
    # status is written; bash runs this trap only once the foreground command has ended.
    trap 'echo "worker.sh: wrapper got SIGTERM" >>"$log_file"' TERM
    trap '' HUP
    cd "$cwd"
    offset=$(stat -c %s "$log_file" 2>/dev/null || echo 0)
    set +e
    "$@" >>"$log_file" 2>&1 </dev/null
    code=$?
    set -e
    if ((code != 0)); then
        outcome=failed
    elif tail -c "+$((offset + 1))" "$log_file" | grep -Eq 'stopped by SIG[A-Z]+ at step'; then
        outcome=signalled  # memjax's graceful stop: checkpoint saved, launch again to resume
    else
        outcome=finished
    fi
    printf '==== memjax exit %s (%s) at %s\n' "$code" "$outcome" "$(date '+%Y-%m-%d %H:%M:%S')" >>"$log_file"
    printf '%s %s\n' "$code" "$outcome" >"$exit_file.tmp"
    mv "$exit_file.tmp" "$exit_file"
}

case $action in
start) start "$@" ;;
_run) _run "$@" ;;
status) status ;;
*) die "unknown action '$action' (start, status)" ;;
esac
