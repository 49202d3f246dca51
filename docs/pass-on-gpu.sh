#!/usr/bin/env bash
# The passes over the whole dataset on a GPU machine without network (the project's lent H100/H200), in one
# command: each backend's clean-pass reader against the PIL pass with 16 workers, then the box update with a
# ResNet-50 forward (bf16, channels_last), on natural-size JPEGs made from the Imagenette subset.
#
# Here (with network):  ../shared/device/pack.sh /tmp/devkit ../shared/device/ffcvkit ../shared/data/imagenette2_224_subset
#                       and carry the parts to the machine (../shared/device/README.md: one .dkNN folder per part)
# There (the checkout as the current folder, the parts copied into /tmp/k):
#   bash docs/pass-on-gpu.sh [IMAGES] [TRAIN_SPEED]
# IMAGES (default 8000): natural-size JPEGs to make; TRAIN_SPEED (default 2915, MoCo v2 ResNet-50 fed by DALI on
# an H200, issue 24's table): the images/s an epoch trains at, for each box update's share of an epoch.
# Writes the table to $OUT/pass.txt (or ./runs/pass.txt).
set -euo pipefail
IMAGES=${1:-8000}
SPEED=${2:-2915}
DEST=${OUT:-runs}
mkdir -p "$DEST"
if [ ! -d /tmp/k/wheels ]; then
    (cd /tmp/k && sha256sum -c SUMS --quiet && cat part* | tar xf -)
fi
python3 -m pip install -q --no-index --no-deps /tmp/k/wheels/*.whl                  # DALI
if ! python3 -c "import ffcv" 2>/dev/null; then
    bash /tmp/k/ffcvkit/build.sh > /tmp/ffcv-build.log 2>&1 || echo "FFCV did not build (see /tmp/ffcv-build.log)"
fi
export LD_LIBRARY_PATH=/tmp/sys/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null            # viewpipe, on the machine's torch
NPZ=$(find /tmp/k -name imagenette2_224_subset.npz | head -1)
BACKENDS=(--backend torch --backend dali --backend memory)
python3 -c "import ffcv" 2>/dev/null && BACKENDS+=(--backend ffcv)
viewpipe bench --pass --data "$NPZ" --split val --make-data /tmp/natural --make-count "$IMAGES" \
    "${BACKENDS[@]}" --workers 16 --batch-size 256 --train-speed "$SPEED" | tee "$DEST/pass.txt"
