#!/usr/bin/env bash
# The stages of run.sh (asr.sh: data, tokens, stats, train, decode, score) without an
# ESPnet checkout, through espnet_ext.bin.asr_pipeline: the same `python -m espnet2.bin.*`
# calls, one fresh interpreter each. Needs only `pip install espnet espnet_ext`.
# Prints WER/CER per set at the end and writes ${expdir}/results.json.
#
#   ./run_cpu.sh --asr_config conf/tuning/train_asr_moe_conformer.yaml
#   ./run_cpu.sh --fast true          # smoke run: 80 train utterances, 1 epoch
#   ./run_cpu.sh --asr_config conf/tuning/train_asr_u2_conformer.yaml \
#       --inference_config conf/decode_attention_rescoring_chunk16.yaml \
#       --decode_tag chunk16 --stages 'decode score report'   # after its training
#   ./run_cpu.sh --asr_config conf/tuning/train_asr_conformer_interctc.yaml \
#       --use_lm true --inference_config conf/decode_asr_lm.yaml \
#       --stages 'data lm decode score report'   # shallow fusion with a char LM
set -euo pipefail

asr_config=conf/tuning/train_asr_conformer.yaml
inference_config=
# Per-utterance mean/variance normalisation: the speakers (adults and children) were
# recorded at very different levels; see README.md, "Getting the dense baseline to learn".
feats_normalize=utterance_mvn
token_type=char  # char or bpe (sentencepiece, --nbpe units), as asr.sh's --token_type
nbpe=30
fast=false
expdir=
datadir=data
stages=
decode_tag=  # decode the trained model again into its own RESULTS row, e.g. chunk16
extra_train_args=  # appended to asr_train's arguments, e.g. "--max_epoch 3"
# Shallow fusion with a character LM of free English text (README, "Language model"):
# trained once into exp_cpu/lm_<lm_config name>, shared by every ASR config; its
# decodes go to their own RESULTS row (<config>_lm).
use_lm=false
lm_config=conf/tuning/train_lm_rnn.yaml
# Extra synthetic training speech (README, "Synthetic speech"; apt-get install espeak-ng
# flite): none, train (the transcripts in new voices) or lm (new sentences). The model
# trains on data/train_tts_<tts> into exp_cpu/<config>_tts<tts>.
tts=none
tts_utts=2400
usage="Usage: $0 [--asr_config yaml] [--inference_config yaml] [--feats_normalize global_mvn|utterance_mvn] [--token_type char|bpe] [--nbpe N] [--fast true|false] [--expdir dir] [--datadir dir] [--stages 'data tokens ...'] [--train_args 'asr_train args'] [--decode_tag tag] [--use_lm true|false] [--lm_config yaml] [--tts none|train|lm] [--tts_utts N]"
while [ $# -gt 0 ]; do
    case "$1" in
        --asr_config) asr_config=$2; shift 2 ;;
        --inference_config) inference_config=$2; shift 2 ;;
        --feats_normalize) feats_normalize=$2; shift 2 ;;
        --token_type) token_type=$2; shift 2 ;;
        --nbpe) nbpe=$2; shift 2 ;;
        --fast) fast=$2; shift 2 ;;
        --expdir) expdir=$2; shift 2 ;;
        --datadir) datadir=$2; shift 2 ;;
        --stages) stages=$2; shift 2 ;;
        --train_args) extra_train_args=$2; shift 2 ;;
        --decode_tag) decode_tag=$2; shift 2 ;;
        --use_lm) use_lm=$2; shift 2 ;;
        --lm_config) lm_config=$2; shift 2 ;;
        --tts) tts=$2; shift 2 ;;
        --tts_utts) tts_utts=$2; shift 2 ;;
        -h|--help) echo "${usage}"; exit 0 ;;
        *) echo "$0: unknown option '$1'" >&2; echo "${usage}" >&2; exit 1 ;;
    esac
done
cd "$(dirname "$0")"

# One thread per job, as ESPnet's path.sh sets. On our shared 2-core machines a 2-thread
# dense training job took 2.4-11 s per 24-utterance update (its threads wait on each
# other whenever the host takes a core away), while two 1-thread jobs side by side took
# ~2.9 s (dense) and ~3.5 s (MoE) each. OMP_NUM_THREADS=2 ./run_cpu.sh overrides it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

suffix=
train_args=
rtf_utts=50
if [ "${fast}" = true ]; then
    suffix=_fast
    train_args="--max_epoch 1"
    rtf_utts=5
    inference_config=${inference_config:-conf/decode_asr_fast.yaml}
fi
inference_config=${inference_config:-conf/decode_asr.yaml}
token_tag=
[ "${token_type}" = bpe ] && token_tag=_bpe${nbpe}
train_set=train
if [ "${tts}" != none ]; then
    train_set=train_tts_${tts}
    token_tag+=_tts${tts}
    # A smoke run speaks a few sentences: enough to exercise synthesis and mixing.
    [ "${fast}" = true ] && tts_utts=$(( tts_utts < 20 ? tts_utts : 20 ))
fi
expdir=${expdir:-exp_cpu/$(basename "${asr_config}" .yaml)${token_tag}${suffix}}

local/data.sh --fast "${fast}" --data_dir "${datadir}" --lm_text "${use_lm}" \
    --tts "${tts}" --tts_utts "${tts_utts}"

lm_args=()
if [ "${use_lm}" = true ]; then
    lm_args=(--use_lm true --lm_config "${lm_config}"
             --lm_train_text "${datadir}/lm_train${suffix}/text"
             --lm_exp_dir "$(dirname "${expdir}")/lm_$(basename "${lm_config}" .yaml)${suffix}")
    # A smoke run's LM: a few updates, enough to exercise training and fusion.
    [ "${fast}" = true ] && lm_args+=(--lm_train_args "--max_epoch 1 --num_iters_per_epoch 5")
fi

stage_args=()
[ -n "${stages}" ] && stage_args=(--stages ${stages})
python3 -m espnet_ext.bin.asr_pipeline \
    --train_dir "${datadir}/${train_set}${suffix}" --valid_dir "${datadir}/dev${suffix}" \
    --test_dirs "${datadir}/test${suffix}" \
    --asr_config "${asr_config}" --inference_config "${inference_config}" \
    --exp_dir "${expdir}" --train_args "${train_args} ${extra_train_args}" --rtf_utts "${rtf_utts}" \
    --feats_normalize "${feats_normalize}" --token_type "${token_type}" --nbpe "${nbpe}" \
    --decode_tag "${decode_tag}" \
    "${lm_args[@]}" "${stage_args[@]}"
