#!/usr/bin/env bash
# Link this recipe to an ESPnet checkout's egs2/TEMPLATE/asr1, like every ESPnet recipe:
#   ESPNET_ROOT=/path/to/espnet ./setup.sh
# Links are relative when the recipe sits inside that checkout (egs2/speechocean762/asr1),
# absolute otherwise. sclite (scoring) comes from `apt-get install sctk`.
set -euo pipefail

if [ -z "${ESPNET_ROOT:-}" ]; then
    echo "$0: set ESPNET_ROOT to an ESPnet source checkout (git clone https://github.com/espnet/espnet)" >&2
    exit 1
fi
template="${ESPNET_ROOT}/egs2/TEMPLATE/asr1"
if [ ! -f "${template}/asr.sh" ]; then
    echo "$0: ${template}/asr.sh not found: ESPNET_ROOT='${ESPNET_ROOT}' is not an ESPnet checkout" >&2
    exit 1
fi

cd "$(dirname "$0")"
here=$(pwd -P)
target=$(cd "${template}" && pwd -P)
if [ "$(cd ../../TEMPLATE/asr1 2>/dev/null && pwd -P)" = "${target}" ]; then
    target=../../TEMPLATE/asr1
fi
for f in asr.sh utils steps scripts pyscripts; do
    if [ -e "${f}" ] && [ ! -L "${f}" ]; then
        echo "$0: ${here}/${f} exists and is not a link; not touching it" >&2
        exit 1
    fi
    ln -sfn "${target}/${f}" "${f}"
done
echo "Linked asr.sh utils steps scripts pyscripts -> ${target}"
command -v python3 >/dev/null && python3 -c "import espnet, espnet_ext" \
    || echo "Warning: python3 cannot import espnet and espnet_ext; pip install them first" >&2
