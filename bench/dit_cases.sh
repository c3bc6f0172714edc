#!/usr/bin/env bash
# DiT speed cases on CPU (issues 15-16): every DiT path of the FreeSpeed nodes timed against the unpatched model on
# full-size architectures with random weights (bench/models.py: Flux-dev's full-width slice -- Flux-dev itself needs
# ~48 GB in fp32 --, SD3.5 Medium, Wan 2.1 1.3B), at CPU-feasible sizes and few steps (say so with the figures).
# Usage: bench/dit_cases.sh OUTDIR [CASE...]   (python with torch and a ComfyUI host at $COMFYUI_PATH; PYTHON to override)
set -u
out=${1:-bench/out/dit}; shift || true
mkdir -p "$out"
py=${PYTHON:-python3}
only=" $* "
run() { local name=$1; shift; [ "$only" != "  " ] && [[ "$only" != *" $name "* ]] && return 0
        echo "== $name: $*"; $py -m bench.case_sampling --device cpu --json "$out/$name.json" "$@" \
          > "$out/$name.log" 2>&1 || echo "FAILED $name (see $name.log)"
        grep -E '"(ratio|model_time_ratio|base_median_s|patched_median_s|ideal_speedup)"' "$out/$name.json" 2>/dev/null; }
EP="--set schedule=every_k --set every_k=3"        # 6 steps: key steps 0 and 3 (the 50ls table needs ~20+ steps)
# Flux-dev slice (2 double + 4 single full-size blocks), 512², guidance-distilled: cfg 1, 6 steps
F="--model flux-dev-slice --resolution 512 --steps 6 --cfg 1 --repeats 1"
run flux_tgate $F --technique tgate
run flux_mapreuse $F --technique mapreuse
run flux_encprop $F --technique encprop $EP
run flux_atedm $F --technique atedm --set dit_start=0.17 --set dit_end=0.83   # the slice: prune 3 of 6 blocks, as Flux-dev 28 of 57
run flux_todo $F --technique todo
run flux_todo_1024 --model flux-dev-slice --resolution 1024 --steps 1 --cfg 1 --repeats 1 --technique todo
# SD3.5 Medium (24 blocks, 13 with the dual image attention), 384², CFG 5, 6 steps
S="--model sd35-medium --resolution 384 --steps 6 --cfg 5 --repeats 1"
run sd35_tgate $S --technique tgate
run sd35_mapreuse $S --technique mapreuse
run sd35_encprop $S --technique encprop $EP
run sd35_atedm $S --technique atedm
run sd35_todo $S --technique todo
# Wan 2.1 T2V 1.3B, 256x256, 2 latent frames (5 video frames), CFG 5, 6 steps
W="--model wan21-1.3b --resolution 256 --steps 6 --cfg 5 --repeats 1"
run wan_tgate $W --technique tgate
run wan_mapreuse $W --technique mapreuse
run wan_encprop $W --technique encprop $EP
run wan_atedm $W --technique atedm
run wan_todo $W --technique todo
run wan_todo_4f --model wan21-1.3b --resolution 320 --frames 4 --steps 1 --cfg 5 --repeats 1 --technique todo
