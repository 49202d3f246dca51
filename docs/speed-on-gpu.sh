#!/usr/bin/env bash
# Issue 24's speed figures on a GPU machine without network (the project's lent H100/H200), in one command:
# natural-size JPEGs (ImageNet's frames and bytes per pixel, `bench --make-data`), every loader row against
# both stock DALI pipelines, then training steps (batch 256, 2 views of 224, bf16, channels_last): MoCo v2
# ResNet-50 fed by DALI and FFCV, SimSiam ResNet-18 fed by DALI, DALI with the callback planned in a thread
# (data.dali_plan_ahead=2), RUNS runs each, and one torch.profiler trace of a MoCo v2 step.
#
# Here (with network):  ../shared/device/pack.sh /tmp/devkit ../shared/device/ffcvkit ../shared/data/imagenette2_224_subset
#                       make quality-kit      (.dkq/wheels: omegaconf, tensorboardX, ... which training imports)
#                       and carry the parts and .dkq to the machine (../shared/device/README.md)
# There (the checkout as the current folder, the parts copied into /tmp/k):
#   bash docs/speed-on-gpu.sh [IMAGES]        IMAGES default 4000; RUNS (default 3), STEPS (default 60) from the env
# About 5 minutes of machine time with the defaults. Writes the JSON of every run and summary.txt (the median
# × synthetic of each row and its spread) to $OUT/speed (or ./runs/speed).
set -euo pipefail
IMAGES=${1:-4000}
RUNS=${RUNS:-3}
STEPS=${STEPS:-60}
DEST=${OUT:-runs}/speed
mkdir -p "$DEST"
if [ ! -d /tmp/k/wheels ]; then
    (cd /tmp/k && sha256sum -c SUMS --quiet && cat part* | tar xf -)
fi
python3 -m pip install -q --no-index --no-deps /tmp/k/wheels/*.whl                  # DALI
[ -d .dkq/wheels ] && python3 -m pip install -q --no-index --find-links .dkq/wheels omegaconf tensorboardX pyyaml tqdm
if ! python3 -c "import ffcv" 2>/dev/null; then
    bash /tmp/k/ffcvkit/build.sh > /tmp/ffcv-build.log 2>&1 || echo "FFCV did not build (see /tmp/ffcv-build.log)"
fi
export LD_LIBRARY_PATH=/tmp/sys/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null            # viewpipe, on the machine's torch
NPZ=$(find /tmp/k -name imagenette2_224_subset.npz | head -1)
FFCV=()
python3 -c "import ffcv" 2>/dev/null && FFCV=(--backend ffcv)
COMMON=(--data /tmp/natural --workers 16 --batch-size 256 --size 224 --json)
# 1. the natural-size JPEGs, converted once (cached), and the loader rows: decode ceilings, the two stock DALI
#    pipelines, the backends with ContrastiveCrop boxes (÷ stock: against the faster stock pipeline)
viewpipe bench --data "$NPZ" --split val --make-data /tmp/natural --make-count "$IMAGES" --workers 16 \
    --backend dali "${FFCV[@]}" --batch-size 256 --batches 30 --json > "$DEST/loaders.json"
cp /tmp/natural/natural.json "$DEST/"
# 2. training steps against synthetic views, RUNS times
for r in $(seq "$RUNS"); do
    viewpipe bench --train "${COMMON[@]}" --backend dali "${FFCV[@]}" --method mocov2 --backbone resnet50 \
        --batches "$STEPS" > "$DEST/mocov2_r50_$r.json"
    viewpipe bench --train "${COMMON[@]}" --backend dali --method simsiam --backbone resnet18 \
        --batches "$STEPS" > "$DEST/simsiam_r18_$r.json"
    viewpipe bench --train "${COMMON[@]}" --backend dali --dali-plan-ahead 2 --method mocov2 --backbone resnet50 \
        --batches "$STEPS" > "$DEST/mocov2_r50_plan_ahead_$r.json"
done
# 3. what happens between the loader's hand-out and the step
viewpipe bench --train "${COMMON[@]}" --backend dali --method mocov2 --backbone resnet50 --batches 20 \
    --profile "$DEST/profile" > "$DEST/profiled.json"
python3 - "$DEST" <<'PY' | tee "$DEST/summary.txt"
import glob, json, statistics, sys
dest = sys.argv[1]
loaders = json.load(open(f"{dest}/loaders.json"))
print("machine:", loaders["machine"])
for r in loaders["rows"]:
    print(f"{r['name']:60s} {r['images_per_s']:10.0f} img/s  ÷ stock DALI {r.get('of_stock_dali') or '-'}")
for kind in ("mocov2_r50", "simsiam_r18", "mocov2_r50_plan_ahead"):
    runs = [json.load(open(p))["rows"] for p in sorted(glob.glob(f"{dest}/{kind}_[0-9]*.json"))]
    for i, row in enumerate(runs[0][1:], 1):
        ratios = [rows[i]["of_synthetic"] for rows in runs]
        print(f"{kind:22s} {row['name']:40s} × synthetic median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} runs of the step count above)")
PY
