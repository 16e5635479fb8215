#!/usr/bin/env bash
# Run HERE (a machine with pip and internet to PyPI) before using a lent GPU machine: downloads into .whl/
# the wheels of loracl's dependencies that the GPU machine's image lacks (it has torch, torchvision, numpy,
# pillow, PyYAML, tqdm, matplotlib, safetensors, but not pydantic or open_clip), at the versions pinned in
# constraints.txt, for the GPU machine's Python (3.12 on x86-64). `.whl/` is git-ignored; name it in the
# device tool's `carry`, and scripts/device_check.sh installs it there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
pkgs="pydantic pydantic_core annotated-types typing-inspection typing_extensions open_clip_torch ftfy wcwidth timm"
rm -rf .whl && mkdir -p .whl
for p in $pkgs; do
  pin=$(grep -i "^${p//_/[-_]}==" constraints.txt || true)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pin:-$p}"
done
ls -l .whl
