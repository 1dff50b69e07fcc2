#!/usr/bin/env bash
# The README's "defaults on four datasets" table: scripts/benchmarks/data.py on the built-in shapes, MNIST,
# OpenMoji at 32 and at 64 px (defaults, and OpenMoji with augmentation), in four parallel lanes.
#
#   bash scripts/benchmarks/defaults.sh ../shared/data bench/data
#
# Each lane writes OUT/NAME/benchmark.json, samples.png and train.log; judges go to OUT/judges/.
set -u
DATA=${1:-../shared/data}
OUT=${2:-bench/data}
PY=${PYTHON:-python}
SWEEP="1:1,1.5:1,2:1,3:1,1:0.9,2:0.9"
bench() { "$PY" scripts/benchmarks/data.py --out "$OUT" --sweep "$SWEEP" --unconditional "$@"; }
mkdir -p "$OUT"
bench --name shapes > "$OUT/shapes.out" 2>&1 &
bench --name mnist --train-args "--data $DATA/mnist --image-size 32 --resize-mode pad" > "$OUT/mnist.out" 2>&1 &
( bench --name openmoji32 --train-args "--data $DATA/openmoji --image-size 32"
  bench --name openmoji32-augment --judge "$OUT/judges/openmoji32" \
        --train-args "--data $DATA/openmoji --image-size 32 --augment flip,translate --code-copies 4"
) > "$OUT/openmoji32.out" 2>&1 &
( bench --name openmoji64 --train-args "--data $DATA/openmoji"
  bench --name openmoji64-augment --judge "$OUT/judges/openmoji64" \
        --train-args "--data $DATA/openmoji --augment flip,translate --code-copies 4"
) > "$OUT/openmoji64.out" 2>&1 &
wait
