#!/usr/bin/env bash
# Step-level speed cases on CPU (what README's CPU table for T-GATE / Encoder Propagation was measured with).
# Usage: bench/cpu_cases.sh OUTDIR   (python with torch and a ComfyUI host at $COMFYUI_PATH; PYTHON to override)
set -u
out=${1:-bench/out}
mkdir -p "$out"
py=${PYTHON:-python3}
run() { local name=$1; shift; echo "== $name: $*"; $py -m bench.case_sampling --device cpu --json "$out/$name.json" "$@" \
          > "$out/$name.log" 2>&1 || echo "FAILED $name (see $name.log)"; grep -E '"(ratio|model_time_ratio|base_s|patched_s)"' "$out/$name.json" 2>/dev/null; }
run tgate_sd15_512 --technique tgate --model sd15 --resolution 512 --repeats 2
run encprop_sd15_512 --technique encprop --model sd15 --resolution 512 --repeats 1
run tgate_sdxl_512 --technique tgate --model sdxl --resolution 512 --repeats 1
