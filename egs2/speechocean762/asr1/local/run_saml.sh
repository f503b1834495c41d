#!/usr/bin/env bash
# SAML (arXiv 2406.19706) on this recipe: expert initialisation from per-speaker LoRAs of
# training speakers, mixture pre-training on the train set, test-time adaptation on the
# first 10 utterances of each test speaker, scoring on their last 10. Four rows:
#   fp32 base | NF4 base | NF4 + one LoRA per speaker | NF4 + SAML per speaker
# Needs a trained base (./run_cpu.sh, conf/tuning/train_asr_conformer.yaml) and
# pip install -c ../../../constraints.txt 'espnet_ext[saml]' (torchao).
#
#   local/run_saml.sh [--base exp_cpu/train_asr_conformer] [--n_experts 10]
#                     [--stages 'base lora experts mixture saml'] [--mixture_epochs N]
#
# Stages: base (rows 1, 2), lora (row 3), experts (one LoRA per training speaker),
# mixture (pre-training, ./run_cpu.sh into exp_cpu/train_asr_saml_adapter: the main
# RESULTS table's row of that config, decoded without speaker adaptation), saml (row 4).
# Each stage but saml can run alone; saml needs experts and mixture. After every run,
# local/saml_rows.py gathers the rows done so far into ${expdir}/saml_rows.json, which
# `local/results.py --collect exp_cpu` turns into README's SAML table.
set -euo pipefail

base=exp_cpu/train_asr_conformer
datadir=data
expdir=exp_cpu/saml
mixdir=exp_cpu/train_asr_saml_adapter
n_experts=10
lora_steps=200       # per training speaker, all of their utterances
adapt_steps=20       # per test speaker, first 10 utterances
inference_config=conf/decode_asr.yaml
mixture_epochs=      # empty: the config's max_epoch; the mixture starts from the trained
                     # base and trains only routers and LoRA experts
stages="base lora experts mixture saml"
while [ $# -gt 0 ]; do
    case "$1" in
        --base) base=$2; shift 2 ;;
        --datadir) datadir=$2; shift 2 ;;
        --expdir) expdir=$2; shift 2 ;;
        --mixdir) mixdir=$2; shift 2 ;;
        --n_experts) n_experts=$2; shift 2 ;;
        --lora_steps) lora_steps=$2; shift 2 ;;
        --adapt_steps) adapt_steps=$2; shift 2 ;;
        --stages) stages=$2; shift 2 ;;
        --mixture_epochs) mixture_epochs=$2; shift 2 ;;
        *) echo "$0: unknown option '$1'" >&2; exit 1 ;;
    esac
done
for s in ${stages}; do
    case "${s}" in
        base|lora|experts|mixture|saml) ;;
        *) echo "$0: unknown stage '${s}' (base lora experts mixture saml)" >&2; exit 1 ;;
    esac
done
has() { [[ " ${stages} " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
base_config=${base}/asr_train/config.yaml
base_model=${base}/asr_train/valid.acc.ave.pth
[ -f "${base_model}" ] || base_model=$(ls "${base}"/asr_train/*.pth | head -n 1)
adapt="python3 -m espnet_ext.bin.adapt_speaker --asr_train_config ${base_config}"
test_args=(--data_dir "${datadir}/test" --speaker all --utt_slice 0:10
           --decode_slice=-10: --inference_config "${inference_config}" --quiet)
mkdir -p "${expdir}"

if has base; then
    # Rows 1 and 2: the base in fp32 and in NF4 (no adaptation step: B = 0, so the
    # adapter adds nothing; the rows decode exactly the base / its NF4 copy).
    ${adapt} --asr_model_file "${base_model}" "${test_args[@]}" --steps 0 \
        --quantize none --output_dir "${expdir}/row1_fp32_base"
    ${adapt} --asr_model_file "${base_model}" "${test_args[@]}" --steps 0 \
        --quantize nf4 --output_dir "${expdir}/row2_nf4_base"
fi

if has lora; then
    # Row 3: NF4 base + one LoRA (rank 4, alpha 64) adapted per test speaker.
    ${adapt} --asr_model_file "${base_model}" "${test_args[@]}" \
        --steps "${adapt_steps}" --quantize nf4 --num_experts 1 --train experts \
        --output_dir "${expdir}/row3_nf4_lora"
fi

# Expert initialisation: one LoRA per training speaker (the n_experts speakers with the
# most utterances), on the fp32 base.
speakers=$(awk '{print NF-1, $1}' "${datadir}/train/spk2utt" | sort -k1,1nr -k2 \
           | head -n "${n_experts}" | awk '{print $2}')
files=()
for spk in ${speakers}; do
    files+=("${expdir}/spk_lora/${spk}.saml.pth")
    if has experts; then
        ${adapt} --asr_model_file "${base_model}" --data_dir "${datadir}/train" \
            --speaker "${spk}" --utt_slice : --steps "${lora_steps}" --num_experts 1 \
            --train experts --quantize none --quiet --output_dir "${expdir}/spk_lora"
    fi
done

mix=${mixdir}/asr_train
if has mixture; then
    # Mixture pre-training on the train set (adapter: saml on the NF4 base, experts
    # from the per-speaker LoRAs, --init_param the base).
    python3 - "${expdir}/train_asr_saml_adapter.yaml" "${files[@]}" <<'PY'
import sys, yaml
out, files = sys.argv[1], sys.argv[2:]
conf = yaml.safe_load(open("conf/tuning/train_asr_saml_adapter.yaml"))
conf["adapter_conf"]["init_experts"] = files
conf["adapter_conf"]["num_experts"] = len(files)
yaml.safe_dump(conf, open(out, "w"), sort_keys=False)
PY
    train_args="--init_param ${base_model}"
    [ -z "${mixture_epochs}" ] || train_args+=" --max_epoch ${mixture_epochs}"
    ./run_cpu.sh --asr_config "${expdir}/train_asr_saml_adapter.yaml" \
        --expdir "${mixdir}" --train_args "${train_args}"
fi

if has saml; then
    mix_model=${mix}/valid.acc.ave.pth
    [ -f "${mix_model}" ] || mix_model=$(ls "${mix}"/*.pth | head -n 1)
    # Row 4: NF4 + SAML adapted per test speaker (alternating router/expert updates).
    python3 -m espnet_ext.bin.adapt_speaker --asr_train_config "${mix}/config.yaml" \
        --asr_model_file "${mix_model}" "${test_args[@]}" --steps "${adapt_steps}" \
        --quantize nf4 --train alternate --output_dir "${expdir}/row4_nf4_saml"
fi

python3 local/saml_rows.py "${expdir}" --base "${base}"
