#!/usr/bin/env bash
# OpenMoji 64 px on one GPU, end to end, in two phases of parallel lanes (docs/benchmarks.md, "OpenMoji 64 px on the card").
#
#   bash scripts/benchmarks/card.sh DATA OUT defaults   # stage 1 MSE vs adversarial; Transformer and masked priors
#   bash scripts/benchmarks/card.sh DATA OUT levers     # a second default stage 1; four priors on its codes
#
# DATA: OpenMoji as an image folder or parquet folder (64 px, 11 groups). Each phase trains its own stage 1(s) at
# the sized defaults, then scores 1000 samples per prior with one judge: scripts/benchmarks/priors.py and
# `vqgen eval --seeds 2`. Logs and JSON land in OUT/PHASE/. For a quick check of the plumbing, S1_ARGS and PRIOR_ARGS
# append options to every stage 1 and every prior (e.g. S1_ARGS="--max-steps 40" PRIOR_ARGS="--max-steps 40"), and
# SAMPLES sets the samples scored per setting (default 1000).
set -u
D=${1:?DATA}; O=${2:?OUT}; PHASE=${3:-defaults}
W=$O/$PHASE
PY=${PYTHON:-python}
N=${SAMPLES:-1000}
S1=(${S1_ARGS:-}); P=(${PRIOR_ARGS:-}); PV=${PRIOR_ARGS:+,${PRIOR_ARGS// /,}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
mkdir -p "$W"
stamp() { echo "[$SECONDS s] $*" | tee -a "$W/progress.txt"; }
wait_for() { while [ ! -f "$1" ]; do sleep 2; done; }

defaults_mse() {  # stage 1 at the defaults; both prior kinds side by side on its codes, judged by the GAN run's judge
  $PY scripts/train_vqvae.py --run $W/mse --data "$D" "${S1[@]}" > $W/mse_stage1.log 2>&1 || { stamp "mse stage 1 failed"; return 1; }
  stamp "mse stage 1 done"
  wait_for $W/gan/judge/model.safetensors
  cp -r $W/gan/judge $W/judge
  $PY scripts/benchmarks/priors.py --run $W/mse --judge $W/judge --out $W/pt --samples $N --variant "transformer=--prior,transformer$PV" \
      --inpaint > $W/priors_t.log 2>&1 &
  $PY scripts/benchmarks/priors.py --run $W/mse --judge $W/judge --out $W/pm --samples $N --variant "masked=--prior,masked$PV" \
      --steps 4,8,12,16,32 --inpaint > $W/priors_m.log 2>&1 &
  wait
  $PY -m vqgen eval --run $W/pt/transformer --samples $N --seeds 2 > $W/eval_mse.log 2>&1
  stamp "mse lane done"
}

defaults_gan() {  # the same stage 1 with an adversarial phase over its last third, then the default prior
  $PY scripts/train_vqvae.py --run $W/gan --data "$D" --adversarial-weight 0.1 --adversarial-start 8000 \
      --lecam-weight 0.001 "${S1[@]}" > $W/gan_stage1.log 2>&1 || { stamp "gan stage 1 failed"; return 1; }
  $PY scripts/train_prior.py --run $W/gan "${P[@]}" > $W/gan_prior.log 2>&1 || { stamp "gan prior failed"; return 1; }
  $PY -m vqgen eval --run $W/gan --samples $N --seeds 2 > $W/eval_gan.log 2>&1
  stamp "gan lane done"
}

lever() {  # NAME PRIOR-OPTIONS...: a prior on the levers phase's codes, scored over cfg 1, 1.5, 3
  local name=$1; shift
  mkdir -p $W/$name; cp -r $W/mse/vqvae $W/mse/codes $W/$name/; rm -rf $W/$name/vqvae/state
  $PY -m vqgen train prior --run $W/$name --no-report "$@" "${P[@]}" > $W/$name.train.log 2>&1 || { stamp "$name failed"; return 1; }
  wait_for $W/mse/judge/model.safetensors
  cp -r $W/mse/judge $W/$name/judge
  $PY -m vqgen eval --run $W/$name --samples $N --seeds 2 --sweep cfg=1,1.5,3 > $W/$name.eval.log 2>&1
  $PY -m vqgen sample --run $W/$name --n 64 --seed 0 --out $W/$name/grid > $W/$name.sample.log 2>&1
  stamp "$name done"
}

case $PHASE in
  defaults)
    defaults_mse & defaults_gan & wait ;;
  levers)
    $PY scripts/train_vqvae.py --run $W/mse --data "$D" "${S1[@]}" > $W/stage1.log 2>&1 || { stamp "stage 1 failed"; exit 1; }
    $PY -c "from vqgen.run import Run; import torch; r = Run.load('$W/mse', need_prior=False,
device='cuda' if torch.cuda.is_available() else 'cpu'); r.judge(r.data())" > $W/judge.log 2>&1 &
    lever transformer --max-steps 2800 &
    lever transformer-5600 --max-steps 5600 &
    lever transformer-code-dropout-5600 --code-dropout 0.1 --max-steps 5600 &
    lever masked --prior masked --max-steps 2800 &
    wait ;;
  *) echo "error: phase must be defaults or levers, got '$PHASE'" >&2; exit 2 ;;
esac
stamp "all done"
