#!/usr/bin/env bash
# The CIFAR-10 quality table on a GPU machine without network (the project's lent H100/H200), in one command.
#
# Here (with network):  make quality-kit        -> .dkq/: the CIFAR-10 JPEG collection + the wheels the machine lacks
# There (the checkout as the current folder, .dkq carried beside it):
#   bash docs/quality-on-gpu.sh [BUDGET_S]       (default 420: the table's training time, in seconds)
#
# It installs the wheels and viewpipe (on the machine's torch), times one epoch of every row, chooses the
# number of epochs that fits BUDGET_S for the eleven rows together (kNN every tenth of the run, a linear probe at
# the end of each row), runs the table and copies quality.md/json/png and the rows' logs to $OUT (or ./runs).
# Rows are resumable: run it again after a timeout and it continues where it stopped. QUALITY_ARGS adds options
# to both `viewpipe quality` calls (a dry run on a CPU: QUALITY_ARGS="--train-images 1000 --test-images 200
# --backbone resnet_tiny --device cpu").
set -euo pipefail
BUDGET_S=${1:-420}
KIT=${KIT:-.dkq}
DEST=${OUT:-runs}/quality-gpu
read -r -a EXTRA <<< "${QUALITY_ARGS:-}"
python3 -m pip install -q --no-index --find-links "$KIT/wheels" omegaconf tensorboardX pyyaml tqdm matplotlib  # what is missing
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
mkdir -p "$DEST"
DATA="$KIT/cifar10_jpeg.npz"
# 1. one epoch of every row: its speed (memory backend: CIFAR-10 decoded once into GPU memory)
[ -f runs/q1/quality.json ] || viewpipe quality --data "$DATA" --out runs/q1 --epochs 1 --linear-epochs 0 \
    --synthetic-steps 30 "${EXTRA[@]}" log_every=20 | tee "$DEST/epoch1.txt"
# 2. the epochs that fit the budget, from the measured images/s (50,000 images per epoch and row, kNN included)
EPOCHS=$(python3 - "$BUDGET_S" <<'PY'
import json, sys
rows = json.load(open("runs/q1/quality.json"))["rows"]
per_epoch = sum(r["minutes_this_run"] * 60 for r in rows)  # one epoch of every row, with its kNN pass
print(max(1, int(float(sys.argv[1]) / per_epoch)))
PY
)
echo "one epoch of every row: see $DEST/epoch1.txt; epochs chosen for ${BUDGET_S}s: $EPOCHS" | tee "$DEST/plan.txt"
KNN=$(( EPOCHS >= 10 ? EPOCHS / 10 : 1 ))
viewpipe quality --data "$DATA" --out runs/quality --epochs "$EPOCHS" --knn-every "$KNN" "${EXTRA[@]}" log_every=50
cp runs/quality/quality.md runs/quality/quality.json runs/quality/knn_per_epoch.png "$DEST"/
for r in runs/quality/*/log.jsonl; do cp "$r" "$DEST/$(basename "$(dirname "$r")").log.jsonl"; done
cat "$DEST/quality.md"
