#!/usr/bin/env bash
# Alternating before/after runs of the W1/W2 CPU bench in two checkouts that share one venv.
#   bash run.sh BEFORE_TREE AFTER_TREE OUT ROUNDS [extra bench args, e.g. --workloads W2 --reps 60]
# BEFORE_TREE needs the extension (pifi_fast/_C*.so, pifi_fast/_build_info.py) copied in; run
# from each tree's root, `python -m pifi_fast.cli` imports that tree (cwd comes first on sys.path).
set -euo pipefail
before=$1 after=$2 out=$3 rounds=$4; shift 4
py=${PY:-python}
mkdir -p "$out"
for i in $(seq "$rounds"); do
  for side in before after; do
    tree=$before; [ $side = after ] && tree=$after
    (cd "$tree" && "$py" -m pifi_fast.cli bench --sizes quick --workloads W1,W2 --device cpu \
       --only smollm2-135m --skip hf_eager hf_compile authors liger pifi_fast_ "$@" \
       --out "$out/$side-$i" > "$out/$side-$i.log" 2>&1)
    echo "$side $i done $(date +%T) load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
