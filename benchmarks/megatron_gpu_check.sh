#!/usr/bin/env bash
# GPU check of the megatron backend on one GPU, in about 5 minutes:
#   1. pytest -m gpu tests/gpu/test_megatron_backend.py  (logits/grads vs the native model, a GRPO step)
#   2. benchmarks/megatron_vs_native.py                  (tokens/s of forward + GRPO loss + backward)
# then a short summary. Needs CUDA torch and megatron-core (pip install r1mega[megatron], or a wheel);
# Transformer Engine and apex are optional. Logs and the benchmark JSON go to $OUT (default /tmp).
#   bash benchmarks/megatron_gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp}"
mkdir -p "$OUT"

python - <<'PY' || exit 1
import torch
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
try:
    import megatron.core
    print("megatron-core", megatron.core.__version__)
except ImportError as e:
    raise SystemExit(f"megatron-core is not importable ({e}): pip install r1mega[megatron]")
try:
    import transformer_engine  # noqa: F401
    print("transformer_engine: installed")
except Exception:
    print("transformer_engine: absent (local spec + SDPA core attention)")
PY

timeout 240 python -m pytest -q -m gpu -p no:cacheprovider -W ignore::UserWarning \
    tests/gpu/test_megatron_backend.py 2>&1 | tee "$OUT/megatron_gpu_tests.txt"
test_rc=${PIPESTATUS[0]}

timeout 180 python benchmarks/megatron_vs_native.py --json "$OUT/megatron_vs_native.json" 2>&1 \
    | tee "$OUT/megatron_vs_native.txt"
bench_rc=${PIPESTATUS[0]}

echo
echo "================ megatron backend GPU check ================"
echo "tests:     $(tail -n 1 "$OUT/megatron_gpu_tests.txt")  (exit $test_rc)"
if [ -s "$OUT/megatron_vs_native.json" ]; then
    python - "$OUT/megatron_vs_native.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"{'model':<18} {'backend':<9} {'tokens/s':>11} {'step ms':>9} {'peak GiB':>9}")
for r in rows:
    print(f"{r['model']:<18} {r['backend']:<9} {r['tokens_per_s']:11.0f} {r['step_ms']:9.1f} {r['peak_gib']:9.2f}")
by = {(r["model"], r["backend"]): r["tokens_per_s"] for r in rows}
for model in dict.fromkeys(r["model"] for r in rows):
    if (model, "native") in by and (model, "megatron") in by:
        print(f"{model}: megatron / native = {by[(model, 'megatron')] / by[(model, 'native')]:.2f}x")
PY
else
    echo "benchmark: no results (exit $bench_rc); see $OUT/megatron_vs_native.txt"
fi
exit $(( test_rc != 0 || bench_rc != 0 ))
