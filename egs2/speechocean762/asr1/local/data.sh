#!/usr/bin/env bash
# Prepare data/{train,dev,test} (or {train,dev,test}_fast with --fast true) from the
# speechocean762 root named in db.sh. Called by asr.sh stage 1 and by run_cpu.sh.
set -euo pipefail

log() {
    local fname=${BASH_SOURCE[1]##*/}
    echo -e "$(date '+%Y-%m-%dT%H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

fast=false
dev_every=25
data_dir=data
lm_text=false  # also write ${data_dir}/lm_train/text, the LM's text (local/lm_text.py)
usage="Usage: $0 [--fast true|false] [--dev_every N] [--data_dir dir] [--lm_text true|false]"
while [ $# -gt 0 ]; do
    case "$1" in
        --fast) fast=$2; shift 2 ;;
        --dev_every) dev_every=$2; shift 2 ;;
        --data_dir) data_dir=$2; shift 2 ;;
        --lm_text) lm_text=$2; shift 2 ;;
        -h|--help) echo "${usage}"; exit 0 ;;
        *) echo "$0: unknown option '$1'" >&2; echo "${usage}" >&2; exit 1 ;;
    esac
done

cd "$(dirname "$0")/.."
. ./db.sh

if [ -z "${SPEECHOCEAN762:-}" ] || [ ! -d "${SPEECHOCEAN762}/train" ]; then
    log "Error: SPEECHOCEAN762='${SPEECHOCEAN762:-}' is not a speechocean762 root (no train/)."
    log "Download it from https://www.openslr.org/101/ and set SPEECHOCEAN762 in db.sh."
    exit 1
fi

extra=()
[ "${fast}" = true ] && extra+=(--fast)
log "Preparing ${data_dir}/ from ${SPEECHOCEAN762}"
python3 local/prepare_data.py "${SPEECHOCEAN762}" "${data_dir}" --dev_every "${dev_every}" "${extra[@]}"
if [ "${lm_text}" = true ]; then
    suffix=
    lm_opts=()
    # Smoke runs: a few hundred sentences per source are enough to exercise the LM.
    [ "${fast}" = true ] && suffix=_fast && lm_opts=(--max_sentences 300)
    log "Writing the LM's text to ${data_dir}/lm_train${suffix}/"
    python3 local/lm_text.py --train_text "${data_dir}/train${suffix}/text" \
        --exclude "${data_dir}/dev${suffix}/text" "${data_dir}/test${suffix}/text" \
        --out_dir "${data_dir}/lm_train${suffix}" "${lm_opts[@]}"
fi
log "Successfully finished."
