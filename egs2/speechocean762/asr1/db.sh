# Corpus location. The default is the prepared copy next to the espnet_ext checkout
# (../shared/data/speechocean762); point it at the original release (OpenSLR 101) or
# export SPEECHOCEAN762 to use another copy.
_recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SPEECHOCEAN762=${SPEECHOCEAN762:-$(cd "${_recipe_dir}/../../../.." 2>/dev/null && pwd)/shared/data/speechocean762}
