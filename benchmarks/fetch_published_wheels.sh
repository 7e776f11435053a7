#!/usr/bin/env bash
# Prepare, on a machine with network, what the GPU machine (no network, Python 3.12, x86-64) needs to run
# the published IVG code beside this project (benchmarks/bench_published.py --device cuda):
#
#     bash benchmarks/fetch_published_wheels.sh PUBLISHED_CHECKOUT
#
# * .published/   a copy of the published checkout (github.com/chadlzx/ivg; it has no licence, so it is
#                 never committed: .gitignore lists it);
# * .whl/published/  the wheels its requirements pin that the GPU image lacks or holds in other
#                 versions: transformers 4.34.1, tokenizers 0.14.1, huggingface_hub 0.17.3,
#                 accelerate 0.23.0, sentence-transformers 3.0.1 (scorer.py imports it), GPUtil 1.4.0
#                 (cbs.py imports it; built here, it has no wheel on PyPI). About 12 MB.
# `bash benchmarks/gpu_suite.sh published` installs them into their own folder there and runs the
# benchmark. FlashInfer is fetched, trimmed, by benchmarks/fetch_flashinfer.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: $0 PUBLISHED_CHECKOUT}"
[ -d "$src/inference_time_alignment" ] || { echo "$src: expected a checkout holding inference_time_alignment/" >&2; exit 2; }
rm -rf .published && mkdir -p .published && cp -r "$src/inference_time_alignment" .published/
mkdir -p .whl/published
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/published transformers==4.34.1 tokenizers==0.14.1 huggingface_hub==0.17.3 accelerate==0.23.0 \
    sentence-transformers==3.0.1
python3 -m pip wheel -q --no-deps -w .whl/published GPUtil==1.4.0
ls -la .whl/published
du -sh .published .whl/published
