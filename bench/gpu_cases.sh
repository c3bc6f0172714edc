#!/usr/bin/env bash
# Step-level speed cases on a CUDA machine (what README's GPU table was measured with).
# Usage: bench/gpu_cases.sh OUTDIR [set]  (python3 with torch+CUDA and a ComfyUI host at $COMFYUI_PATH)
set -u
out=${1:-bench/out}
set_=${2:-all}
mkdir -p "$out"
py=${PYTHON:-python3}
run() { local name=$1; shift; echo "== $name: $*"; $py -m bench.case_sampling --device cuda --json "$out/$name.json" "$@" \
          > "$out/$name.log" 2>&1 || echo "FAILED $name (see $name.log)"; grep -E '"(ratio|model_time_ratio)"' "$out/$name.json" 2>/dev/null; }
if [ "$set_" = all ] || [ "$set_" = small ]; then
run tgate_sd15_512 --technique tgate --model sd15 --resolution 512 --repeats 5
run tgate_sdxl_1024 --technique tgate --model sdxl --resolution 1024 --repeats 3
run encprop_sd15_512 --technique encprop --model sd15 --resolution 512 --repeats 5
run encprop_sdxl_1024 --technique encprop --model sdxl --resolution 1024 --repeats 3
fi
if [ "$set_" = all ] || [ "$set_" = large ]; then
run tgate_sd15_1024_b4 --technique tgate --model sd15 --resolution 1024 --batch 4 --repeats 3
run tgate_sdxl_1024_b4 --technique tgate --model sdxl --resolution 1024 --batch 4 --repeats 3
run encprop_sd15_1024_b4 --technique encprop --model sd15 --resolution 1024 --batch 4 --repeats 3
fi
