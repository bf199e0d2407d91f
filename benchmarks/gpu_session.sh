#!/usr/bin/env bash
# The GPU work of issue #5 in parts that each end within 10 minutes (one device call each; every
# part reinstalls zoo, since a machine starts bare). Results go to $OUT (default
# benchmarks/results/); each JSON is rewritten after every record, so a part stopped by its
# timeout keeps what it measured. Afterwards, here:
#   python benchmarks/targets.py <the JSON files> --out benchmarks/results/targets_<gpu>.md
#
#   bash benchmarks/gpu_session.sh tests      # pytest -m gpu (kernels at full shapes, models)
#   bash benchmarks/gpu_session.sh bench224   # routed at 224+1024 px, NA at 224 px
#   bash benchmarks/gpu_session.sh bench1024  # NA at 1024 px (every family at 128x128 too)
#   bash benchmarks/gpu_session.sh baselines  # compiled flex and NATTEN at the target maps
#   bash benchmarks/gpu_session.sh tune       # launch configurations on the target cases
#
# NATTEN is not on the device image: carry its pure-Python package (the one `make test`
# installs) in an ignored folder .carry/ (`carry: [".carry"]`); this script puts it on the path.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .carry ]; then export PYTHONPATH="$PWD/.carry${PYTHONPATH:+:$PYTHONPATH}"; fi
python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" || exit 1

part=${1:-}
case "$part" in
  tests)  # pytest-xdist (where installed) spreads the kernel compiles over the CPU cores
    workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout 560 python -m pytest -m gpu tests -q -p no:cacheprovider $workers -rfE \
      2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench224)
    timeout 200 python benchmarks/bench_routed.py --out "$OUT/routed.json"
    timeout 340 python benchmarks/bench_na.py --img 224 \
      --methods triton reference sdpa_dense sdpa_windows --out "$OUT/na_224.json" ;;
  bench1024)
    timeout 560 python benchmarks/bench_na.py --img 1024 \
      --methods triton reference sdpa_dense sdpa_windows --out "$OUT/na_1024.json" ;;
  baselines)  # each distinct shape compiles: only the maps the targets name
    timeout 240 python benchmarks/bench_na.py --families nat dinat --maps 56 128 \
      --methods flex --out "$OUT/na_flex.json"
    timeout 310 python benchmarks/bench_na.py --families nat --maps 56 128 \
      --methods natten --out "$OUT/na_natten.json" ;;
  tune)
    timeout 560 python benchmarks/tune_triton.py --cases na_56 na_56_nobias swin_56 \
      --grid num_stages=2 --out "$OUT/tune.json" ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh tests|bench224|bench1024|baselines|tune" >&2
    exit 2 ;;
esac
