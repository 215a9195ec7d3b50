# shellcheck shell=bash
# Settings and helpers shared by tpu_scripts/*.sh. Sourced by each script, never run on its own.
#
# Every setting is an environment variable; the flags in COMMON_FLAGS_HELP override it for one call.
# A script calls `parse_flags "$@"`, then `finalize_settings`, then `require VAR ...` for what it needs.
# shellcheck disable=SC2034  # the settings are read by the scripts that source this file

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "error: tpu_scripts need bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
    exit 2
fi

TPU_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_SCRIPTS_DIR/.." && pwd)"
SCRIPT_NAME="$(basename "$0")"

# ---- settings --------------------------------------------------------------------------------------
# The TPU and where it lives.
TPU_NAME="${TPU_NAME:-}"              # TPU (node) name; --name
TPU_ZONE="${TPU_ZONE:-}"              # e.g. us-west4-a; --zone
TPU_PROJECT="${TPU_PROJECT:-}"        # GCP project id; --project
TPU_TYPE="${TPU_TYPE:-}"              # accelerator type, e.g. v5litepod-64, v4-64; --type
TPU_RUNTIME="${TPU_RUNTIME:-}"        # runtime (software) version; default from TPU_TYPE; --runtime
TPU_QR_ID="${TPU_QR_ID:-}"            # queued-resource id; default "$TPU_NAME-qr"; --qr-id
TPU_SPOT="${TPU_SPOT:-0}"             # 1: spot (preemptible) capacity; --spot
TPU_RESERVED="${TPU_RESERVED:-0}"     # 1: use the project's reservation; --reserved
TPU_WORKERS="${TPU_WORKERS:-}"        # number of workers (hosts); default from TPU_TYPE
TPU_CREATE_FLAGS="${TPU_CREATE_FLAGS:-}"  # extra flags for queued-resources create (space separated)
TPU_SSH_FLAGS="${TPU_SSH_FLAGS:-}"    # extra flags for tpu-vm ssh/scp, e.g. --internal-ip
# The run.
TPU_BUCKET="${TPU_BUCKET:-}"          # gs://bucket[/prefix] for checkpoints; --bucket
RUN_NAME="${RUN_NAME:-}"              # names the log files and the checkpoint folder; default TPU_NAME; --run
TRAIN_CONFIG="${TRAIN_CONFIG:-}"      # config file, relative to the repository; --config
TRAIN_WORKDIR="${TRAIN_WORKDIR:-}"    # --workdir on the workers; default memjax-runs/RUN_NAME; --workdir
TRAIN_CHECKPOINT_DIR="${TRAIN_CHECKPOINT_DIR:-}"  # default TPU_BUCKET/RUN_NAME
TRAIN_OVERRIDES="${TRAIN_OVERRIDES:-}"  # space separated --config.a.b=v (flags add more)
TRAIN_ENV="${TRAIN_ENV:-}"            # space separated KEY=VALUE set for the training process
# Where things go on the workers: relative paths are under the worker's home directory.
REMOTE_REPO_DIR="${REMOTE_REPO_DIR:-memjax}"
REMOTE_VENV_DIR="${REMOTE_VENV_DIR:-memjax-venv}"
REMOTE_LOG_DIR="${REMOTE_LOG_DIR:-memjax-logs}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"  # jax >= 0.7 needs Python >= 3.11
# Behaviour.
DRY_RUN="${DRY_RUN:-0}"               # 1: print the gcloud commands instead of running them; --dry-run
ASSUME_YES="${ASSUME_YES:-0}"         # 1: no confirmation prompts; --yes

OVERRIDES=()   # --config.a.b=v for memjax.train: TRAIN_OVERRIDES, then the flags
EXTRA_FLAGS=() # the script-specific flags that parse_flags saw, as given
LOC=()         # --zone/--project for every gcloud call; set by finalize_settings
SSH_FLAGS=()

COMMON_FLAGS_HELP="Settings (environment variable / flag):
  TPU_NAME      --name NAME          TPU (node) name
  TPU_ZONE      --zone ZONE          e.g. us-west4-a (v5e), us-central2-b (v4)
  TPU_PROJECT   --project PROJECT    GCP project id
  TPU_TYPE      --type TYPE          accelerator type: v5litepod-64, v4-64, ...
  TPU_RUNTIME   --runtime VERSION    default: v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4),
                                     v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
  TPU_QR_ID     --qr-id ID           queued-resource id (default: TPU_NAME-qr)
  TPU_SPOT=1    --spot               spot capacity (cheaper, preemptible)
  TPU_RESERVED=1 --reserved          use a reservation
  TPU_BUCKET    --bucket gs://B[/P]  checkpoints go to TPU_BUCKET/RUN_NAME
  RUN_NAME      --run NAME           default: TPU_NAME
  TRAIN_CONFIG  --config PATH        config file relative to the repository, e.g. configs/titans_340m.py
  TRAIN_WORKDIR --workdir DIR        default: memjax-runs/RUN_NAME (under the workers' home)
  TRAIN_OVERRIDES --config.a.b=v     memjax config overrides (flags: repeat, always with '=')
  DRY_RUN=1     --dry-run            print the gcloud commands (\"+ gcloud ...\") and run nothing
  More: TPU_WORKERS, TPU_CREATE_FLAGS, TPU_SSH_FLAGS, TRAIN_CHECKPOINT_DIR, TRAIN_ENV,
        REMOTE_REPO_DIR, REMOTE_VENV_DIR, REMOTE_LOG_DIR, PYTHON_VERSION (see tpu_scripts/README.md)."

# ---- messages --------------------------------------------------------------------------------------
log() { printf '[%s %s] %s\n' "$SCRIPT_NAME" "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'error: %s\n(see %s --help)\n' "$*" "$SCRIPT_NAME" >&2; exit 2; }

# ---- flags -----------------------------------------------------------------------------------------
# parse_flags ARGS...: the common flags set their settings; the script-specific flags named in
# SCRIPT_FLAGS (e.g. "--worker: --follow", a trailing ':' = takes a value) land in EXTRA_FLAGS as
# "--flag" or "--flag=value"; --help calls the script's usage function.
parse_flags() {
    local flag value has_value spec s
    local -a from_env=()
    read -ra from_env <<<"$TRAIN_OVERRIDES"
    OVERRIDES=("${from_env[@]}")
    EXTRA_FLAGS=()
    while (($#)); do
        flag=$1
        shift
        case $flag in
        --config.*)
            [[ $flag == *=* ]] || usage_error "write config overrides as $flag=VALUE"
            OVERRIDES+=("$flag")
            continue
            ;;
        --*=*) value=${flag#*=} flag=${flag%%=*} has_value=1 ;;
        *) value="" has_value=0 ;;
        esac
        case $flag in
        -h | --help) usage; exit 0 ;;
        --dry-run | --spot | --reserved | --yes | -y)
            ((has_value == 0)) || usage_error "$flag takes no value"
            case $flag in
            --dry-run) DRY_RUN=1 ;;
            --spot) TPU_SPOT=1 ;;
            --reserved) TPU_RESERVED=1 ;;
            *) ASSUME_YES=1 ;;
            esac
            ;;
        --name | --zone | --project | --type | --runtime | --qr-id | --bucket | --run | --config | --workdir)
            if ((has_value == 0)); then
                (($#)) || usage_error "$flag needs a value"
                value=$1
                shift
            fi
            case $flag in
            --name) TPU_NAME=$value ;;
            --zone) TPU_ZONE=$value ;;
            --project) TPU_PROJECT=$value ;;
            --type) TPU_TYPE=$value ;;
            --runtime) TPU_RUNTIME=$value ;;
            --qr-id) TPU_QR_ID=$value ;;
            --bucket) TPU_BUCKET=$value ;;
            --run) RUN_NAME=$value ;;
            --config) TRAIN_CONFIG=$value ;;
            --workdir) TRAIN_WORKDIR=$value ;;
            esac
            ;;
        -*)
            spec=""
            for s in ${SCRIPT_FLAGS:-}; do
                [[ ${s%:} == "$flag" ]] && spec=$s
            done
            [[ -n $spec ]] || usage_error "unknown flag $flag"
            if [[ $spec == *: ]]; then
                if ((has_value == 0)); then
                    (($#)) || usage_error "$flag needs a value"
                    value=$1
                    shift
                fi
                EXTRA_FLAGS+=("$flag=$value")
            else
                ((has_value == 0)) || usage_error "$flag takes no value"
                EXTRA_FLAGS+=("$flag")
            fi
            ;;
        *) usage_error "unexpected argument '$flag'" ;;
        esac
    done
}

# extra_flag NAME [DEFAULT]: the value of a script-specific flag (the last one given), "1" for a
# switch that was given, else DEFAULT.
extra_flag() {
    local name=$1 result=${2-} f
    for f in ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}; do
        if [[ $f == "$name" ]]; then
            result=1
        elif [[ $f == "$name="* ]]; then
            result=${f#*=}
        fi
    done
    printf '%s' "$result"
}

# ---- derived settings and checks ------------------------------------------------------------------
default_runtime() {
    case $1 in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) echo "" ;;
    esac
}

# workers_for_type TYPE: hosts in a single-slice TPU of that accelerator type ("" if unknown).
# v5e/v6e count chips (4 per host above 8 chips); v2/v3/v4/v5p count TensorCores (8 per host).
workers_for_type() {
    local n=${1##*-}
    [[ $n =~ ^[0-9]+$ ]] || { echo ""; return; }
    case $1 in
    v5litepod-* | v5e-* | v6e-*) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    v2-* | v3-* | v4-* | v5p-*) if ((n <= 8)); then echo 1; else echo $((n / 8)); fi ;;
    *) echo "" ;;
    esac
}

finalize_settings() {
    TPU_QR_ID=${TPU_QR_ID:-${TPU_NAME:+$TPU_NAME-qr}}
    [[ -n $TPU_RUNTIME || -z $TPU_TYPE ]] || TPU_RUNTIME=$(default_runtime "$TPU_TYPE")
    [[ -n $TPU_WORKERS || -z $TPU_TYPE ]] || TPU_WORKERS=$(workers_for_type "$TPU_TYPE")
    RUN_NAME=${RUN_NAME:-$TPU_NAME}
    TRAIN_WORKDIR=${TRAIN_WORKDIR:-${RUN_NAME:+memjax-runs/$RUN_NAME}}
    if [[ -n $TPU_BUCKET ]]; then
        TPU_BUCKET=${TPU_BUCKET%/}
        [[ $TPU_BUCKET == gs://* ]] || TPU_BUCKET="gs://$TPU_BUCKET"
    fi
    if [[ -z $TRAIN_CHECKPOINT_DIR && -n $TPU_BUCKET && -n $RUN_NAME ]]; then
        TRAIN_CHECKPOINT_DIR="$TPU_BUCKET/$RUN_NAME"
    fi
    [[ $DRY_RUN == 1 || $DRY_RUN == true ]] && DRY_RUN=1 || DRY_RUN=0
    [[ $ASSUME_YES == 1 || $ASSUME_YES == true ]] && ASSUME_YES=1 || ASSUME_YES=0
    LOC=("--zone=$TPU_ZONE" "--project=$TPU_PROJECT")
    read -ra SSH_FLAGS <<<"$TPU_SSH_FLAGS"
    # Later scripts (babysit runs the others) see the same settings.
    export TPU_NAME TPU_ZONE TPU_PROJECT TPU_TYPE TPU_RUNTIME TPU_QR_ID TPU_SPOT TPU_RESERVED TPU_WORKERS \
        TPU_CREATE_FLAGS TPU_SSH_FLAGS TPU_BUCKET RUN_NAME TRAIN_CONFIG TRAIN_WORKDIR TRAIN_CHECKPOINT_DIR \
        TRAIN_ENV REMOTE_REPO_DIR REMOTE_VENV_DIR REMOTE_LOG_DIR PYTHON_VERSION DRY_RUN
}

flag_for() {
    case $1 in
    TPU_NAME) echo --name ;; TPU_ZONE) echo --zone ;; TPU_PROJECT) echo --project ;;
    TPU_TYPE) echo --type ;; TPU_RUNTIME) echo --runtime ;; TPU_BUCKET) echo --bucket ;;
    RUN_NAME) echo --run ;; TRAIN_CONFIG) echo --config ;; TRAIN_WORKDIR) echo --workdir ;;
    *) echo "" ;;
    esac
}

# require VAR...: every named setting is non-empty, else one error naming all the missing ones.
require() {
    local var flag missing=()
    for var; do
        # A runtime version is derived from the accelerator type: ask for it only once that is known.
        [[ $var != TPU_RUNTIME || -n $TPU_TYPE || " $* " != *" TPU_TYPE "* ]] || continue
        if [[ -z ${!var:-} ]]; then
            flag=$(flag_for "$var")
            missing+=("$var (export $var=...${flag:+ or pass $flag})")
        fi
    done
    if ((${#missing[@]})); then
        printf 'error: missing setting: %s\n' "${missing[@]}" >&2
        if [[ " $* " == *" TPU_RUNTIME "* && -z $TPU_RUNTIME && -n $TPU_TYPE ]]; then
            echo "  (no default runtime version for accelerator type $TPU_TYPE)" >&2
        fi
        echo "(see $SCRIPT_NAME --help)" >&2
        exit 2
    fi
    check_values
}

check_values() {
    local var
    [[ -z $RUN_NAME || $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME '$RUN_NAME': use letters, digits, '.', '_', '-'"
    for var in REMOTE_REPO_DIR REMOTE_VENV_DIR REMOTE_LOG_DIR TRAIN_WORKDIR; do
        [[ -z ${!var} || ${!var} =~ ^/?[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*/?$ ]] ||
            die "$var '${!var}': use a plain path (letters, digits, '.', '_', '-', '/'), relative to the workers' home or absolute"
        [[ ! ${!var} =~ (^|/)\.\.?(/|$) ]] || die "$var '${!var}': no '.' or '..' parts"
    done
    [[ $TPU_SPOT != 1 || $TPU_RESERVED != 1 ]] || die "TPU_SPOT and TPU_RESERVED exclude each other"
    [[ -z $TPU_BUCKET || $TPU_BUCKET =~ ^gs://[a-z0-9][a-z0-9._-]*[a-z0-9](/.*)?$ ]] || die "TPU_BUCKET '$TPU_BUCKET' is not a gs:// bucket"
}

# ---- running commands ------------------------------------------------------------------------------
dry_run() { [[ $DRY_RUN == 1 ]]; }

# shell_quote WORD: WORD as the shell would read it back (bare when that is safe, else in '...').
shell_quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$1"
    else
        local q="'\\''"
        printf "'%s'" "${1//\'/$q}"
    fi
}

quote_words() {
    local out=() word
    for word; do out+=("$(shell_quote "$word")"); done
    printf '%s' "${out[*]}"
}

# run CMD...: runs CMD, or in dry-run prints "+ CMD" (one line, quoted so it can be pasted).
run() {
    if dry_run; then
        printf '+ %s\n' "$(quote_words "$@")"
        return 0
    fi
    "$@"
}

gc() { run gcloud "$@"; }

nap() {
    if dry_run; then printf '+ sleep %s\n' "$1"; else sleep "$1"; fi
}

# remote_path PATH: PATH as it reads inside double quotes in a worker's shell ($HOME for relative).
remote_path() {
    # shellcheck disable=SC2016  # $HOME is for the worker's shell to expand
    if [[ $1 == /* ]]; then printf '%s' "${1%/}"; else printf '$HOME/%s' "${1%/}"; fi
}

# tpu_ssh WORKER COMMAND: runs COMMAND (one line of bash) on worker WORKER ("all" for every worker).
tpu_ssh() {
    gc compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$1" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} \
        --quiet --command="$2"
}

# gcloud_capture ARGS...: runs gcloud, its stdout into G_OUT (trailing blank lines dropped) and its
# stderr into G_ERR (warnings there must not pass for an answer); returns gcloud's status.
gcloud_capture() {
    local errfile rc=0
    errfile=$(mktemp)
    G_OUT=$(gcloud "$@" 2>"$errfile") || rc=$?
    G_ERR=$(<"$errfile")
    rm -f "$errfile"
    return "$rc"
}

# ---- state queries (dry-run: simulated) ------------------------------------------------------------
# query_qr_state: sets QR_STATE to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES,
# PROVISIONING, FAILED, SUSPENDING, SUSPENDED, ...), MISSING if there is none, UNKNOWN if gcloud
# failed otherwise. Dry-run: prints the command and takes TPU_FAKE_STATE (default $1, else ACTIVE).
query_qr_state() {
    if dry_run; then
        gc compute tpus queued-resources describe "$TPU_QR_ID" "${LOC[@]}" --format='value(state.state)'
        QR_STATE=${TPU_FAKE_STATE:-${1:-ACTIVE}}
        return
    fi
    if gcloud_capture compute tpus queued-resources describe "$TPU_QR_ID" "${LOC[@]}" \
        --format='value(state.state)'; then
        QR_STATE=${G_OUT##*$'\n'}
        QR_STATE=${QR_STATE:-UNKNOWN}
    elif [[ $G_ERR == *NOT_FOUND* || $G_ERR == *"not found"* ]]; then
        QR_STATE=MISSING
    else
        log "queued-resources describe failed: ${G_ERR//$'\n'/ }"
        QR_STATE=UNKNOWN
    fi
}

# query_node_state: sets NODE_STATE to the TPU node's state (READY, CREATING, PREEMPTED, TERMINATED,
# ...), MISSING or UNKNOWN. Dry-run: TPU_FAKE_NODE_STATE, default READY when the fake queued
# resource is ACTIVE, else MISSING.
query_node_state() {
    local fallback=MISSING
    if dry_run; then
        gc compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" --format='value(state)'
        [[ ${TPU_FAKE_STATE:-ACTIVE} != ACTIVE ]] || fallback=READY
        NODE_STATE=${TPU_FAKE_NODE_STATE:-$fallback}
        return
    fi
    if gcloud_capture compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" --format='value(state)'; then
        NODE_STATE=${G_OUT##*$'\n'}
        NODE_STATE=${NODE_STATE:-UNKNOWN}
    elif [[ $G_ERR == *NOT_FOUND* || $G_ERR == *"not found"* ]]; then
        NODE_STATE=MISSING
    else
        log "tpu-vm describe failed: ${G_ERR//$'\n'/ }"
        NODE_STATE=UNKNOWN
    fi
}
