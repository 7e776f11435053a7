#!/usr/bin/env bash
# Put the demo's trained models (base, DPO-tuned and reference guides, token RM: about 6 MB) where a GPU
# machine's command can read them, so the GPU benchmarks of the demo's models (bench_speculative's default
# set, issue 14's trained acceptance) do not train them there first:
#
#     bash benchmarks/pack_demo_models.sh        # builds them here if ~/.cache/ivg (IVG_CACHE) lacks them
#
# writes .whl/ivg-demo/ (git-ignored, as .whl is); carry `.whl` and `benchmarks/gpu_suite.sh` reads the models
# from there (it sets IVG_CACHE to that folder when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
src=$("$PY" -c 'import sys; sys.path.insert(0, "python")
from ivg.demo.build import build, cache_root
build(progress=False)
print(cache_root())' | tail -n 1)
rm -rf .whl/ivg-demo && mkdir -p .whl/ivg-demo
for d in "$src"/demo-*/; do
    [ -f "$d/DONE" ] && cp -r "$d" .whl/ivg-demo/
done
ls .whl/ivg-demo
du -sh .whl/ivg-demo
