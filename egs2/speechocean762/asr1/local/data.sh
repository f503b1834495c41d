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
# Synthetic speech (local/tts_data.py; apt-get install espeak-ng flite): "train" speaks
# the training transcripts again, "lm" new sentences of the LM's text. Writes
# ${data_dir}/train_tts_<tts>: the real training set plus --tts_utts synthetic ones.
tts=none
tts_utts=2400
usage="Usage: $0 [--fast true|false] [--dev_every N] [--data_dir dir] [--lm_text true|false] [--tts none|train|lm] [--tts_utts N]"
while [ $# -gt 0 ]; do
    case "$1" in
        --fast) fast=$2; shift 2 ;;
        --dev_every) dev_every=$2; shift 2 ;;
        --data_dir) data_dir=$2; shift 2 ;;
        --lm_text) lm_text=$2; shift 2 ;;
        --tts) tts=$2; shift 2 ;;
        --tts_utts) tts_utts=$2; shift 2 ;;
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

case "${tts}" in
    none|train|lm) ;;
    *) log "Error: --tts must be none, train or lm, got '${tts}'"; exit 1 ;;
esac
extra=()
[ "${fast}" = true ] && extra+=(--fast)
log "Preparing ${data_dir}/ from ${SPEECHOCEAN762}"
python3 local/prepare_data.py "${SPEECHOCEAN762}" "${data_dir}" --dev_every "${dev_every}" "${extra[@]}"
[ "${tts}" = lm ] && lm_text=true
suffix=
[ "${fast}" = true ] && suffix=_fast
if [ "${lm_text}" = true ]; then
    lm_opts=()
    # Smoke runs: a few hundred sentences per source are enough to exercise the LM.
    [ "${fast}" = true ] && lm_opts=(--max_sentences 300)
    log "Writing the LM's text to ${data_dir}/lm_train${suffix}/"
    python3 local/lm_text.py --train_text "${data_dir}/train${suffix}/text" \
        --exclude "${data_dir}/dev${suffix}/text" "${data_dir}/test${suffix}/text" \
        --out_dir "${data_dir}/lm_train${suffix}" "${lm_opts[@]}"
fi
if [ "${tts}" != none ]; then
    tts_opts=(--text "${data_dir}/train${suffix}/text")
    # lm_text.py already dropped dev and test; the training transcripts are dropped
    # here so that "lm" speaks only new sentences.
    [ "${tts}" = lm ] && tts_opts=(--text "${data_dir}/lm_train${suffix}/text"
                                   --exclude "${data_dir}/train${suffix}/text")
    log "Synthesising ${tts_utts} utterances (${tts}) into ${data_dir}/tts_${tts}${suffix}/"
    python3 local/tts_data.py "${tts_opts[@]}" --source "${tts}" --num_utts "${tts_utts}" \
        --out_dir "${data_dir}/tts_${tts}${suffix}" --combine "${data_dir}/train${suffix}" \
        --combined_dir "${data_dir}/train_tts_${tts}${suffix}"
fi
log "Successfully finished."
