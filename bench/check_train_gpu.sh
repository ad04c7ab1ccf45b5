#!/usr/bin/env bash
# GPU check of train.py (tiny default): bf16 autocast + dynamo_backend=inductor + fused AdamW, and an exact resume
# (6 steps straight vs 6 steps, checkpoint-6 and the LoRA deleted, resumed from checkpoint-3). Usage on the device:
#     OUT=$OUT bash bench/check_train_gpu.sh $PWD
R=$1; cd /tmp
A="--mixed_precision=bf16 --dynamo_backend=inductor --validation_prompt=null --max_train_steps=6 --checkpointing_steps=3 --lora_dropout=0.1 --gradient_checkpointing=true"
timeout 200 python3 $R/train.py --output_dir=/tmp/ra $A > $OUT/gpu_train.log 2>&1; echo rc_a=$?
timeout 100 python3 $R/train.py --output_dir=/tmp/rb $A --dynamo_backend=no > /tmp/rb.log 2>&1; echo rc_b=$?
rm -rf /tmp/rb/checkpoint-6 /tmp/rb/pytorch_lora_weights.safetensors
timeout 100 python3 $R/train.py --output_dir=/tmp/rb $A --dynamo_backend=no >> /tmp/rb.log 2>&1; echo rc_b2=$?
timeout 100 python3 $R/train.py --output_dir=/tmp/rc $A --dynamo_backend=no > /tmp/rc.log 2>&1; echo rc_c=$?
grep -h "resumed\|compiled\|step 6/6\|step 1/6" $OUT/gpu_train.log /tmp/rb.log | cut -c1-150
python3 - <<'PY'
from safetensors.torch import load_file
import json
a, b, c = (load_file(f"/tmp/r{x}/pytorch_lora_weights.safetensors") for x in "abc")
d = lambda x, y: max((x[k].float() - y[k].float()).abs().max().item() for k in x)
print("resume (eager) vs straight (eager):", d(b, c), " compiled vs eager:", d(a, c))
la = [json.loads(l)["loss"] for l in open("/tmp/ra/metrics.jsonl")]; lc = [json.loads(l)["loss"] for l in open("/tmp/rc/metrics.jsonl")]
print("losses compiled", [round(x, 4) for x in la]); print("losses eager   ", [round(x, 4) for x in lc])
PY
