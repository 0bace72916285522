#!/usr/bin/env bash
# Device call (issue 7): transformers eager and torch.compile on the 8-layer 35B-A3B checkpoint of
# bench/device_35b.sh (same seed, same weights; ours was timed on it by bench/e2e.py), while a 397B-A17B
# engine of one layer of each kind (FP8) builds beside them; its per-layer times are taken after the
# transformers runs (--run-after), so no two timings overlap.
# Usage (on the device, repo root, fla wheel carried in .whl): bash bench/device_hf_397b.sh h200 $OUT
set -u
TARGET=${1:-h200}; OUT=${2:?out dir}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
rm -f /tmp/hf.done
python3 bench/device_big.py --out "$OUT" --preset 397b-a17b --layers 2 --layer-types linear_attention,full_attention \
  --dtype fp8 --target "$TARGET" --ckpt /tmp/b397_ckpt --engine /dev/shm/b397_engine --tag _2layers --quick \
  --run-after /tmp/hf.done > "$OUT/b397.log" 2>&1 &
python3 bench/e2e.py --out /tmp/e2e_ckpt --work /tmp/e35 --preset 35b-a3b --layers 8 --systems "" > /dev/null 2>&1
python3 bench/e2e.py --out "$OUT" --work /tmp/e35 --preset 35b-a3b --layers 8 --target "$TARGET" --timeout 130 \
  --systems hf-eager 2>&1 | cut -c1-1500
cp "$OUT/e2e.json" /tmp/e2e_eager.json
python3 bench/e2e.py --out /tmp/e2e_c --work /tmp/e35 --preset 35b-a3b --layers 8 --target "$TARGET" --timeout 150 \
  --systems hf-compile 2>&1 | cut -c1-1500
python3 - "$OUT" <<'PY'
import json, sys
a = json.load(open("/tmp/e2e_eager.json")); b = json.load(open("/tmp/e2e_c/e2e.json"))
a["hf-compile"] = b.get("hf-compile")
json.dump(a, open(sys.argv[1] + "/e2e.json", "w"), indent=1)
PY
touch /tmp/hf.done
wait
grep -h "^checkpoint\|^build\|rror" "$OUT/b397.log" | cut -c1-800
python3 - "$OUT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/big_397b-a17b_fp8_2layers.json")).get("run", {})
for row in r.get("layers", []):
    print(row)
PY
