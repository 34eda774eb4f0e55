#!/usr/bin/env bash
# Carry what bench/gpu.py needs to the lent GPU machine, which reaches no package registry.
#
# That machine has Python 3.12, torch 2.11 (CUDA 13) and onnxruntime 1.30 (the CPU build), but not
# onnxruntime-gpu, Ray, or the smaller packages patchwatch needs beyond its image. A call to it carries at most
# 64 MiB, so the packages travel as xz-compressed tar streams of their installed files, split into ~51 MB parts,
# one or two parts a call on consecutive calls (the machine stays warm only ~30 s between calls).
#
# Here (a machine with pip and the registry):
#   bash bench/gpu_carry.sh prepare [--no-ray]   resolve for cp312 manylinux, download, install each group into a
#                                               folder, tar | xz -6 | split into bench/results/carry/ (ignored by
#                                               git), and write bench/results/carry/plan.txt: the carry list of
#                                               each call, in order
#   bash bench/gpu_carry.sh prepare-fair         for issue 18's CamVid training (bench/gpu_fair.py) instead: the
#                                               small packages (no onnxruntime-gpu, no Ray) and the whole of
#                                               CamVid (train, val and their labels, ~120 MB), three calls
# There (the device run's command, from the repository root):
#   bash bench/gpu_carry.sh stash                calls 1..N-1: copy the parts this call carried to /tmp/pw-carry
#   bash bench/gpu_carry.sh bench [ARGS...]      call N: stash, reassemble and untar into /tmp/pw-site, set
#                                               PYTHONPATH and LD_LIBRARY_PATH, run bench/gpu.py --out $OUT/gpu ARGS
#   bash bench/gpu_carry.sh fair [ARGS...]       prepare-fair's last call: stash, unpack (CamVid into /tmp/pw-data),
#                                               run bench/gpu_fair.py train --out $OUT/fair ARGS; here, land what
#                                               comes back: python bench/gpu_fair.py land FILES_AT/fair
#   eval "$(bash bench/gpu_carry.sh env)"        the environment alone, after `unpack`
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY_DIR="bench/results/carry"          # relative to the repository root: what `carry` names
STASH=/tmp/pw-carry                       # on the device: parts gathered across calls
SITE=/tmp/pw-site                         # on the device: the --target folder put on PYTHONPATH
DATA=/tmp/pw-data                         # on the device: $PATCHWATCH_DATA, where the carried CamVid is unpacked
DATA_GROUPS="camvid"                      # carried groups that are data, unpacked into $DATA, not $SITE
PART_SIZE=51M                             # one part plus the repository stays under a call's 64 MiB
CALL_LIMIT_BYTES=$((60 * 1024 * 1024))    # what one call may carry besides the repository (~1 MiB)
DEVICE_PYTHON=3.12
CAMVID_SAMPLE=8                           # CamVid val images carried for the parity gate
PLATFORMS=(manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64
           manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64)
# Already on the device (its image's package list, 2026-11): never carried. torch and the nvidia-* CUDA wheels
# are there in the versions onnxruntime-gpu's cuda/cudnn extras ask for (CUDA 13, cuDNN 9). grpcio is there too, but
# at 1.84, older than Ray Serve's generated gRPC code needs (>= 1.85, seen on the H200 2026-12-04): it travels.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle colorama contourpy cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cycler
filelock flatbuffers fonttools frozenlist fsspec h11 h5py hf-xet httpcore httpx huggingface-hub idna imageio
iniconfig jinja2 joblib kiwisolver lazy-loader markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath
msgpack multidict narwhals networkx numpy onnx onnx-ir onnxruntime onnxscript opencv-python-headless packaging
pandas pillow pip pluggy prometheus-client propcache protobuf psutil pyarrow pygments pyparsing pytest
pytest-timeout python-dateutil pyyaml regex requests rich safetensors scipy setuptools six sympy tqdm torch
torchvision triton typing-extensions urllib3 uvloop werkzeug wheel wrapt yarl zipp"
# Backports of standard-library modules (cityscapesscripts asks for `typing`): on PYTHONPATH they would shadow
# the standard library itself.
STDLIB_BACKPORTS="typing dataclasses enum34"

die() { echo "gpu_carry: $*" >&2; exit 1; }

platform_flags() {
    local flags=(--only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp
                 --abi "cp${DEVICE_PYTHON/./}" --abi abi3 --abi none)
    for platform in "${PLATFORMS[@]}"; do flags+=(--platform "$platform"); done
    flags+=(--platform any)
    printf '%s\n' "${flags[@]}"
}

# The project's requirements for the device: base + gpu (+ serve), less what the device has or must not get.
project_requirements() {
    local with_ray=$1
    python3 - "$ROOT/pyproject.toml" "$with_ray" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
wanted = project["dependencies"] + extras["gpu"] + (extras["serve"] if sys.argv[2] == "1" else [])
for requirement in wanted:
    name = re.split(r"[\s\[<>=!~;]", requirement, 1)[0].lower()
    # torch/torchvision and the nvidia-* CUDA wheels are the device's own; onnxruntime-gpu replaces the CPU build
    if name in ("torch", "torchvision", "onnxruntime") or name.startswith("nvidia-"):
        continue
    print(re.sub(r"\[cuda,cudnn\]", "", requirement))
EOF
}

# name==version url, one a line, for every package the device lacks.
resolve_missing() {
    local with_ray=$1 work=$2
    mapfile -t flags < <(platform_flags)
    mapfile -t requirements < <(project_requirements "$with_ray")
    python3 -m pip install --quiet --dry-run --ignore-installed --report "$work/report.json" \
        --target "$work/resolve" "${flags[@]}" "${requirements[@]}" >/dev/null
    python3 - "$work/report.json" "$DEVICE_HAS $STDLIB_BACKPORTS" <<'EOF'
import json, re, sys
have = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2].split()}
for item in json.load(open(sys.argv[1]))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if name in have or name.startswith("nvidia-"):
        continue
    print(f"{name}=={item['metadata']['version']}")
EOF
}

group_of() {
    case "$1" in
        onnxruntime-gpu==*) echo ort ;;
        ray==*) echo ray ;;
        *) echo deps ;;
    esac
}

# Download the pinned wheels of each group and install them, without dependencies, into $work/site/GROUP.
install_groups() {
    local work=$1; shift
    mapfile -t flags < <(platform_flags)
    for pin in "$@"; do
        local group; group=$(group_of "$pin")
        python3 -m pip download --quiet --no-deps "${flags[@]}" -d "$work/wheels/$group" "$pin"
    done
    for group_dir in "$work"/wheels/*; do
        local group; group=$(basename "$group_dir")
        python3 -m pip install --quiet --no-deps --no-index --no-compile --ignore-installed \
            --target "$work/site/$group" "${flags[@]}" "$group_dir"/*.whl
    done
}

pack_groups() {
    local work=$1
    for site in "$work"/site/*; do
        local group; group=$(basename "$site")
        echo "gpu_carry: packing $group ($(du -sh "$site" | cut -f1) installed)" >&2
        tar -C "$site" -cf - . | xz -6 -T0 | split -b "$PART_SIZE" -d -a 2 - "$ROOT/$CARRY_DIR/$group.tar.xz."
    done
}

camvid_sample() {
    local data="${PATCHWATCH_DATA:-$ROOT/../shared/data}/camvid/val"
    [ -d "$data" ] || { echo "gpu_carry: no CamVid at $data: the parity gate will use random images" >&2; return; }
    mkdir -p "$ROOT/$CARRY_DIR/camvid-val"
    find "$data" -maxdepth 1 -name '*.png' | sort | head -n "$CAMVID_SAMPLE" \
        | xargs -I{} cp {} "$ROOT/$CARRY_DIR/camvid-val/"
}

# Pack the carried files into calls of at most CALL_LIMIT_BYTES, in order, and write plan.txt.
write_plan() {
    python3 - "$ROOT" "$CARRY_DIR" "$CALL_LIMIT_BYTES" "$1" <<'EOF'
import os, sys
root, carry, limit, last_action = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
folder = os.path.join(root, carry)
files = sorted(f for f in os.listdir(folder) if ".tar.xz." in f)
items = [(os.path.join(carry, f), os.path.getsize(os.path.join(folder, f))) for f in files]
if os.path.isdir(os.path.join(folder, "camvid-val")):
    sample = os.path.join(folder, "camvid-val")
    size = sum(os.path.getsize(os.path.join(sample, f)) for f in os.listdir(sample))
    items.append((os.path.join(carry, "camvid-val"), size))
calls = []
for path, size in sorted(items, key=lambda item: -item[1]):  # first fit, largest first
    room = [call for call in calls if sum(s for _, s in call) + size <= limit]
    if size > limit:
        sys.exit(f"{path} is {size / 2**20:.0f} MiB, over one call's {limit / 2**20:.0f} MiB")
    if room:
        room[0].append((path, size))
    else:
        calls.append([(path, size)])
with open(os.path.join(folder, "plan.txt"), "w") as plan:
    for number, call in enumerate(calls, 1):
        paths = [p for p, _ in call] + [os.path.join(carry, "manifest.txt")]
        action = last_action if number == len(calls) else "stash"
        plan.write(f"call {number}/{len(calls)} ({sum(s for _, s in call) / 2**20:.0f} MiB): "
                   f"carry={paths} command='bash bench/gpu_carry.sh {action}'\n")
with open(os.path.join(folder, "manifest.txt"), "w") as manifest:
    manifest.write("\n".join(f for f in files) + "\n")
print(open(os.path.join(folder, "plan.txt")).read(), end="")
EOF
}

prepare() {
    local with_ray=1
    [ "${1:-}" = "--no-ray" ] && with_ray=0
    local work; work=$(mktemp -d /tmp/pw-carry-build.XXXXXX)
    rm -rf "${ROOT:?}/$CARRY_DIR" && mkdir -p "$ROOT/$CARRY_DIR"
    git -C "$ROOT" check-ignore -q "$CARRY_DIR/x" \
        || die "$CARRY_DIR is not ignored by git: it would travel on every call"
    echo "gpu_carry: resolving for CPython $DEVICE_PYTHON manylinux (ray: $with_ray)" >&2
    resolve_missing "$with_ray" "$work" > "$work/pins.txt"
    mapfile -t pins < "$work/pins.txt"
    echo "gpu_carry: the device lacks: ${pins[*]}" >&2
    install_groups "$work" "${pins[@]}"
    pack_groups "$work"
    camvid_sample
    write_plan bench
    rm -rf "$work"
}

# The whole of CamVid as the data group `camvid` (PNGs: xz -0 only frames the stream).
camvid_group() {
    local data="${PATCHWATCH_DATA:-$ROOT/../shared/data}"
    local parts=(camvid/train camvid/trainannot camvid/val camvid/valannot)
    for part in "${parts[@]}"; do [ -d "$data/$part" ] || die "no $data/$part: CamVid is needed for the fair runs"; done
    echo "gpu_carry: packing CamVid ($(du -shc "${parts[@]/#/$data/}" | tail -1 | cut -f1))" >&2
    tar -C "$data" -cf - "${parts[@]}" | xz -0 -T0 | split -b "$PART_SIZE" -d -a 2 - "$ROOT/$CARRY_DIR/camvid.tar.xz."
}

prepare_fair() {
    local work; work=$(mktemp -d /tmp/pw-carry-build.XXXXXX)
    rm -rf "${ROOT:?}/$CARRY_DIR" && mkdir -p "$ROOT/$CARRY_DIR"
    git -C "$ROOT" check-ignore -q "$CARRY_DIR/x" \
        || die "$CARRY_DIR is not ignored by git: it would travel on every call"
    resolve_missing 0 "$work" | grep -v '^onnxruntime-gpu==' > "$work/pins.txt" || true
    mapfile -t pins < "$work/pins.txt"
    echo "gpu_carry: the device lacks: ${pins[*]}" >&2
    install_groups "$work" "${pins[@]}"
    pack_groups "$work"
    camvid_group
    write_plan fair
    rm -rf "$work"
}

stash() {
    mkdir -p "$STASH"
    cd "$ROOT"
    [ -d "$CARRY_DIR" ] || die "this call carried nothing under $CARRY_DIR (name its paths in carry)"
    find "$CARRY_DIR" -mindepth 1 -maxdepth 1 ! -name plan.txt -exec cp -r {} "$STASH/" \;
    local held; held=$(find "$STASH" -name '*.tar.xz.*' | wc -l)
    echo "gpu_carry: $STASH holds $held of $(wc -l < "$STASH/manifest.txt") parts" >&2
}

unpack() {
    [ -f "$STASH/manifest.txt" ] || die "no manifest in $STASH: run the stash calls first"
    local missing; missing=$(cd "$STASH" && while read -r part; do [ -f "$part" ] || echo "$part"; done < manifest.txt)
    [ -z "$missing" ] || die "parts missing (a call was skipped, or the machine went back between calls): $missing"
    mkdir -p "$SITE" "$DATA"
    for group in $(sed -n 's/\.tar\.xz\.[0-9]*$//p' "$STASH/manifest.txt" | sort -u); do
        local into="$SITE"
        [[ " $DATA_GROUPS " == *" $group "* ]] && into="$DATA"
        # python's lzma, not the xz binary: the device image need not have xz
        cat "$STASH/$group".tar.xz.* | python3 -c "
import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz') as archive:
    archive.extractall('$into', **({'filter': 'tar'} if hasattr(tarfile, 'tar_filter') else {}))"
        echo "gpu_carry: unpacked $group into $into" >&2
    done
}

env_lines() {
    local nvidia_libs
    # torch's CUDA 13 wheels (nvidia/cu13/lib, nvidia/cudnn/lib, ...): what onnxruntime-gpu's CUDA provider loads
    nvidia_libs=$(python3 -c "import glob, os, torch; print(':'.join(sorted(glob.glob(os.path.join(
        os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', '*', 'lib')))))" 2>/dev/null) || nvidia_libs=""
    echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
    if [ -n "$nvidia_libs" ]; then
        echo "export LD_LIBRARY_PATH=$nvidia_libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    else
        echo "# no torch with nvidia/*/lib folders for $(command -v python3): LD_LIBRARY_PATH left as it is" >&2
    fi
    echo "export PATH=$SITE/bin:\$PATH"
}

bench() {
    stash
    unpack
    eval "$(env_lines)"
    export PYTHONPATH="$ROOT:$PYTHONPATH"  # the project is not installed there: Ray's workers import it from here
    cd "$ROOT"
    local parity=()
    [ -d "$STASH/camvid-val" ] && parity=(--parity-source "$STASH/camvid-val")
    PYTHONUNBUFFERED=1 python3 bench/gpu.py --out "${OUT:-bench/results/gpu}/gpu" ${parity[@]+"${parity[@]}"} "$@"
}

fair() {
    stash
    unpack
    eval "$(env_lines)"
    export PYTHONPATH="$ROOT:$PYTHONPATH"
    cd "$ROOT"
    PATCHWATCH_DATA="$DATA" PYTHONUNBUFFERED=1 python3 bench/gpu_fair.py train \
        --out "${OUT:-bench/results/gpu_fair_out}/fair" "$@"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    prepare-fair) prepare_fair ;;
    fair) shift; fair "$@" ;;
    resolve) work=$(mktemp -d); resolve_missing "${2:-1}" "$work"; rm -rf "$work" ;;
    stash) stash ;;
    unpack) unpack ;;
    env) env_lines ;;
    bench) shift; bench "$@" ;;
    *) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
