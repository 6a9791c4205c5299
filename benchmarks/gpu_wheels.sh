#!/usr/bin/env bash
# Recreate .whl/: the packages clbd needs that the GPU machine's image lacks (open_clip_torch, webdataset, torchdata,
# jsonargparse[signatures], deepspeed and what each of them needs beyond the image), downloaded without their
# dependencies and pinned to the versions the suite is tested with. The image already holds torch 2.11, torchvision
# 0.26, lightning, torchmetrics, tensorboard, numpy, pillow, pyyaml, regex, tqdm, safetensors, huggingface_hub,
# requests, einops, msgpack, ninja, psutil, py-cpuinfo, packaging, setuptools: none of those is downloaded, and
# torch is never reinstalled. benchmarks/gpu_check.sh installs the result with pip --no-index --no-deps.
#
#   benchmarks/gpu_wheels.sh            # for the GPU machine (CPython 3.12, x86-64 manylinux)
#   PY_VERSION=3.11 benchmarks/gpu_wheels.sh /tmp/whl311   # for a local rehearsal on this machine's Python
# (BUILD_PYTHON=/path/to/python with torch, for DeepSpeed's wheel; default python3.)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py_version=${PY_VERSION:-3.12}
mkdir -p "$dest"
# Pure-Python or abi3 wheels, plus pydantic-core (compiled per Python version). One version of each.
wheels=(
    open_clip_torch==3.3.0 timm==1.0.31 ftfy==6.3.1 wcwidth==0.9.4
    webdataset==0.2.111 braceexpand==0.1.7
    torchdata==0.11.0
    jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 typing_extensions==4.16.0
    hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${wheels[@]}"
# DeepSpeed is published as a source archive only. Built here into a pure-Python wheel without its C++/CUDA ops
# (DS_BUILD_OPS=0): its setup.py imports torch, so BUILD_PYTHON must have torch and setuptools >= 70.1 (bdist_wheel
# built in). None of its ops is recorded as installed, so at run time DeepSpeed JIT-builds any op it needs against
# the machine's own torch and never checks the torch version recorded here.
build_python=${BUILD_PYTHON:-python3}
sdist=$(mktemp -d)
python3 -m pip download --quiet --no-deps --no-binary=:all: -d "$sdist" deepspeed==0.19.8
DS_BUILD_OPS=0 "$build_python" -m pip wheel --quiet --no-deps --no-build-isolation --no-index -w "$dest" \
    "$sdist"/deepspeed-0.19.8.tar.gz
rm -rf "$sdist"
du -sh "$dest"
ls "$dest"
