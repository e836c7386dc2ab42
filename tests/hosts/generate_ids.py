"""Run under torchrun on every host (tests/test_hosts.py): greedy ids of fixed prompts -> JSON.

    torchrun ... tests/hosts/generate_ids.py MODEL OUT.json [timeout_s] [max_new_tokens]
"""

import json
import os
import sys

import torch

import tpllama

model, out = sys.argv[1], sys.argv[2]
timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
new = int(sys.argv[4]) if len(sys.argv) > 4 else 12
prompts = [[5, 6, 7, 8, 9], [11, 3, 42, 17, 99, 23, 5, 61]]
with tpllama.load(model, world_size=int(os.environ["WORLD_SIZE"]), timeout_s=timeout_s) as engine:
    ids = [engine.generate(torch.tensor([p]), max_new_tokens=new, ignore_eos=True)[0].tolist() for p in prompts]
    with open(out, "w") as fh:
        json.dump({"ids": ids, "backend": engine.info["backend"], "parts": engine.info["parts"]}, fh)
