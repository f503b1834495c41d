# Run every job on this machine (see egs2/TEMPLATE/asr1/cmd.sh for queue back-ends).
export train_cmd="run.pl"
export cuda_cmd="run.pl"
export decode_cmd="run.pl"
