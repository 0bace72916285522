#!/usr/bin/env bash
# One device call: where the layer time goes (bench/profile_layers.py, eager and compiled) and the GDN
# prefill launch-config tune (bench/gdn.py's tune(), which now also tries WY_JOINT_INV).
#   bash bench/device_profile.sh $OUT
set -u
OUT=${1:?out dir}
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt 2>&1
timeout 150 python3 bench/profile_layers.py --eager --out $OUT/profile_35b_eager.json > $OUT/log_35b_eager.txt 2>&1
timeout 120 python3 -c "
import json, sys; sys.path.insert(0, 'bench')
import gdn
t = gdn.tune(); b = gdn.breakdown()
json.dump({'tune': t, 'breakdown': b}, open('$OUT/gdn_tune.json', 'w'), indent=1, default=str)
print(json.dumps(t['prefill_8192'], indent=1, default=str)); print(b)
" > $OUT/log_gdn.txt 2>&1
timeout 100 python3 bench/profile_layers.py --eager --preset 397b-a17b --dtype fp8 --prefill 8192 --decode 1,64 \
  --out $OUT/profile_397b_eager.json > $OUT/log_397b_eager.txt 2>&1
timeout 170 python3 bench/profile_layers.py --dtype bf16 --prefill 8192 --decode 1 \
  --out $OUT/profile_35b_compiled.json > $OUT/log_35b_compiled.txt 2>&1
cd $OUT && tar czf logs.tgz log_*.txt && rm log_*.txt
