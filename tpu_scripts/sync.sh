#!/usr/bin/env bash
# Copies this checkout (the files git knows about, without .venv, runs or .git) to every worker.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_FLAGS="--list"

usage() {
    cat <<EOF
Usage: $SCRIPT_NAME [flags] [--list]

Packs the repository's files (git ls-files: tracked files plus untracked ones that .gitignore does not
exclude, leaving out .venv/, runs/ and .git/) into a tarball, copies it to every worker with
'gcloud compute tpus tpu-vm scp --worker=all' and unpacks it into REMOTE_REPO_DIR (default: memjax
under the workers' home), replacing what was there. The venv lives elsewhere (REMOTE_VENV_DIR), and
the editable install from setup.sh keeps pointing at REMOTE_REPO_DIR, so code changes need only
sync.sh; a changed dependency list needs setup.sh again. A running training process keeps the code it
started with; the next launch uses the new code.

  --list    print the files that would be copied and exit (runs no gcloud)

Needs TPU_NAME, TPU_ZONE, TPU_PROJECT.

$COMMON_FLAGS_HELP
EOF
}

parse_flags "$@"
finalize_settings

# list_files: NUL-separated paths (relative to the repository) to ship.
list_files() {
    local path
    git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
        die "$REPO_ROOT is not a git checkout: sync.sh ships the files git lists"
    while IFS= read -r -d '' path; do
        case $path in
        .venv | .venv/* | runs | runs/* | .git | .git/* | */__pycache__/* | *.pyc) continue ;;
        esac
        [[ -f $REPO_ROOT/$path || -L $REPO_ROOT/$path ]] || continue  # deleted but still tracked
        printf '%s\0' "$path"
    done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard)
}

if [[ $(extra_flag --list) == 1 ]]; then
    list_files | tr '\0' '\n'
    exit 0
fi

require TPU_NAME TPU_ZONE TPU_PROJECT REMOTE_REPO_DIR
repo=$(remote_path "$REMOTE_REPO_DIR")
tarball_name="memjax-sync-$RUN_NAME.tar.gz"
unpack="set -e; rm -rf \"$repo.new\"; mkdir -p \"$repo.new\""
unpack+="; tar -xzf \"\$HOME/$tarball_name\" -C \"$repo.new\""
unpack+="; rm -rf \"$repo\"; mv \"$repo.new\" \"$repo\"; rm -f \"\$HOME/$tarball_name\""
unpack+="; echo \"memjax-sync: \$(hostname) has \$(find \"$repo\" -type f | wc -l) files in $repo\""

if dry_run; then
    count=$(list_files | tr -cd '\0' | wc -c)
    printf '+ %s  # %s files from git ls-files\n' \
        "$(quote_words tar -czf "<tmp>/$tarball_name" -C "<repo>" --null -T -)" "$((count))"
    gc compute tpus tpu-vm scp "<tmp>/$tarball_name" "$TPU_NAME:$tarball_name" "${LOC[@]}" --worker=all \
        ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --quiet
    tpu_ssh all "$unpack"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
list_files | tar -czf "$tmp/$tarball_name" -C "$REPO_ROOT" --null -T -
log "packed $(list_files | tr -cd '\0' | wc -c) files ($(du -h "$tmp/$tarball_name" | cut -f1)); copying to every worker of $TPU_NAME"
gc compute tpus tpu-vm scp "$tmp/$tarball_name" "$TPU_NAME:$tarball_name" "${LOC[@]}" --worker=all \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --quiet
tpu_ssh all "$unpack"
log "synced to $REMOTE_REPO_DIR on every worker"
