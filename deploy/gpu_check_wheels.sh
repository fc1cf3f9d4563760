#!/usr/bin/env bash
# Wheels `deploy/gpu_check.py` needs on a GPU machine that has torch, transformers and safetensors
# but no package registry: the project's config and message code (pydantic, pydantic-settings,
# msgspec) and what they need. Run it on a machine WITH a registry, from anywhere; it fills
# <repo>/.whl (git-ignored), which travels with the checkout. gpu_check.py installs them from
# there with `pip install --no-index --target` only when an import is missing.
#
#   deploy/gpu_check_wheels.sh [PYTHON_VERSION]     # default 3.12, the GPU image's Python
#
# Versions are the ones the project's tests run with; --no-deps: every dependency is named here.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-3.12}"
dest="$repo/.whl"
mkdir -p "$dest"

wheels=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    pydantic-settings==2.16.3
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    python-dotenv==1.2.4
    msgspec==0.23.0
)

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done

python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" -d "$dest" "${wheels[@]}"
ls -l "$dest"
du -sh "$dest"
