# Like egs2/TEMPLATE/asr1/path.sh, but the ESPnet root is found through the asr.sh link
# that ./setup.sh makes, so the recipe also runs from outside the ESPnet tree.
_asr_sh=$(readlink -f asr.sh)
MAIN_ROOT=$(cd "$(dirname "${_asr_sh}")/../../.." && pwd)

export PATH=$PWD/utils/:$PATH
export LC_ALL=C

# A git checkout of ESPnet has no tools/activate_python.sh: then the current python
# (with pip-installed espnet and espnet_ext) is used.
if [ -f "${MAIN_ROOT}"/tools/activate_python.sh ]; then
    . "${MAIN_ROOT}"/tools/activate_python.sh
fi
if [ -f "${MAIN_ROOT}"/tools/extra_path.sh ]; then
    . "${MAIN_ROOT}"/tools/extra_path.sh
fi
# Debian/Ubuntu's sctk package (sclite, for asr.sh's scoring) installs outside PATH.
if [ -d /usr/lib/sctk/bin ]; then
    export PATH=$PATH:/usr/lib/sctk/bin
fi

# ESPnet's default: one thread per job (asr.sh runs several jobs in parallel).
# `OMP_NUM_THREADS=2 ./run.sh` lets single-job training use both cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONIOENCODING=UTF-8
