#!/usr/bin/env bash
# On every worker: makes a venv and installs the synced memjax with its `tpu` extra.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_FLAGS="--recreate"
SETUP_USE_UV="${SETUP_USE_UV:-1}"     # 1: uv makes the venv (fetches PYTHON_VERSION if the image lacks it)
SETUP_PIP_ARGS="${SETUP_PIP_ARGS:-}"  # extra arguments for the install, e.g. a -f/--find-links URL
SETUP_EXTRA="${SETUP_EXTRA:-}"        # one more shell command for every worker, e.g. fetching data

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [flags] [--recreate]

Runs on every worker (gcloud compute tpus tpu-vm ssh --worker=all): creates the venv REMOTE_VENV_DIR
(default memjax-venv under the home directory) and runs 'pip install -e "REMOTE_REPO_DIR[tpu]"'.
Run sync.sh first: this installs the code sync.sh copied. jax >= 0.7 needs Python >= 3.11, newer than
the python3 of the Ubuntu 22.04 TPU images, so by default uv (installed for the user if missing)
makes the venv with Python PYTHON_VERSION=$PYTHON_VERSION, downloading it when needed. SETUP_USE_UV=0 uses
'python3 -m venv' and pip instead (the image's python3 must then be >= 3.11).

  --recreate      delete the venv first

SETUP_PIP_ARGS: extra install arguments. SETUP_EXTRA: a shell command run on every worker after the
install (e.g. copy the training data: 'gcloud storage cp -r gs://B/data ~/data').
Needs TPU_NAME, TPU_ZONE, TPU_PROJECT.

$COMMON_FLAGS_HELP
EOF
}

parse_flags "$@"
finalize_settings
require TPU_NAME TPU_ZONE TPU_PROJECT REMOTE_REPO_DIR REMOTE_VENV_DIR

repo=$(remote_path "$REMOTE_REPO_DIR")
venv=$(remote_path "$REMOTE_VENV_DIR")
read -ra pip_args <<<"$SETUP_PIP_ARGS"
pip_extra=""
for arg in ${pip_args[@]+"${pip_args[@]}"}; do pip_extra+=" $(shell_quote "$arg")"; done

steps=("set -e"
    "test -f \"$repo/pyproject.toml\" || { echo \"memjax-setup: no $repo/pyproject.toml on \$(hostname): run tpu_scripts/sync.sh first\" >&2; exit 1; }")
[[ $(extra_flag --recreate) != 1 ]] || steps+=("rm -rf \"$venv\"")
if [[ $SETUP_USE_UV == 1 ]]; then
    # shellcheck disable=SC2016  # expanded by the worker's shell
    steps+=('export PATH="$HOME/.local/bin:$PATH"'
        "command -v uv >/dev/null 2>&1 || python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh"
        "test -x \"$venv/bin/python\" || uv venv --python $(shell_quote "$PYTHON_VERSION") \"$venv\""
        "uv pip install --python \"$venv/bin/python\" -e \"${repo}[tpu]\"$pip_extra")
else
    steps+=("test -x \"$venv/bin/python\" || python3 -m venv \"$venv\""
        "\"$venv/bin/python\" -m pip install --quiet --upgrade pip"
        "\"$venv/bin/python\" -m pip install -e \"${repo}[tpu]\"$pip_extra")
fi
steps+=("\"$venv/bin/python\" -c 'import socket, sys, jax, memjax; print(\"memjax-setup: ok on\", socket.gethostname(), \"python\", sys.version.split()[0], \"jax\", jax.__version__)'")
[[ -z $SETUP_EXTRA ]] || steps+=("$SETUP_EXTRA")

command=""
for step in "${steps[@]}"; do command+="${command:+; }$step"; done
log "installing into $REMOTE_VENV_DIR on every worker of $TPU_NAME"
tpu_ssh all "$command"
