#!/usr/bin/env bash
# speechocean762 ASR with ESPnet's asr.sh (needs an ESPnet checkout: run ./setup.sh first).
# Every option of asr.sh can be appended, e.g.
#   ./run.sh --asr_config conf/tuning/train_asr_moe_conformer.yaml
#   ./run.sh --fast true             # smoke run: 80 train utterances, 1 epoch
#   ./run.sh --use_lm true           # + a character LM of free English text (README)
#   ./run.sh --tts lm                # + 2400 synthetic utterances (README, espeak-ng flite)
# Without a checkout, ./run_cpu.sh runs the same stages.
set -euo pipefail

fast=false
use_lm=false
tts=none  # none, train or lm: local/tts_data.py's --source (README, "Synthetic speech")
tts_utts=2400
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --fast) fast=$2; shift 2 ;;
        --use_lm) use_lm=$2; shift 2 ;;
        --tts) tts=$2; shift 2 ;;
        --tts_utts) tts_utts=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

if [ ! -e asr.sh ]; then
    echo "$0: asr.sh is missing; run 'ESPNET_ROOT=/path/to/espnet ./setup.sh' first" >&2
    exit 1
fi

suffix=
fast_opts=()
expdir=exp
if [ "${fast}" = true ]; then
    suffix=_fast
    expdir=exp_fast
    fast_opts=(--asr_args "--max_epoch 1" --inference_config conf/decode_asr_fast.yaml)
fi
# Stage 1 writes data/train_tts_<tts>: the real training set plus the synthetic one. Its
# models go to their own exp dir (asr.sh's tags and statistics do not name the set).
train_set=train
if [ "${tts}" != none ]; then
    train_set=train_tts_${tts}
    expdir+=_tts${tts}
fi
# The LM's text (local/lm_text.py) is written by stage 1; asr.sh trains the LM in
# stages 6-8 on the ASR token list and fuses it in stage 12.
lm_opts=(--use_lm false --lm_train_text "data/train${suffix}/text")
if [ "${use_lm}" = true ]; then
    lm_opts=(--use_lm true --lm_config conf/tuning/train_lm_rnn.yaml
             --lm_train_text "data/lm_train${suffix}/text")
    if [ "${fast}" = true ]; then
        lm_opts+=(--lm_args "--max_epoch 1 --num_iters_per_epoch 5")
    else
        lm_opts+=(--inference_config conf/decode_asr_lm.yaml)
    fi
fi

./asr.sh \
    --lang en \
    --ngpu 0 \
    --nj 2 \
    --inference_nj 2 \
    --feats_type raw \
    --audio_format flac \
    --token_type char \
    --max_wav_duration 30 \
    --feats_normalize utterance_mvn \
    --asr_config conf/tuning/train_asr_conformer.yaml \
    --inference_config conf/decode_asr.yaml \
    --train_set "${train_set}${suffix}" \
    --valid_set "dev${suffix}" \
    --test_sets "dev${suffix} test${suffix}" \
    --local_data_opts "--fast ${fast} --lm_text ${use_lm} --tts ${tts} --tts_utts ${tts_utts}" \
    --expdir "${expdir}" \
    "${lm_opts[@]}" "${fast_opts[@]}" "${args[@]}"
