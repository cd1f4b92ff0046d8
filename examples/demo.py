"""Small demo: async save of a model + optimizer, fsck, load back, compare.

    python examples/demo.py OUT_DIR
"""
from __future__ import annotations

import subprocess
import sys
import time

import torch

import ckptstore


def main(out: str) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        loss = model(torch.randn(32, 512)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 5,
             "rng": torch.get_rng_state()}
    t0 = time.perf_counter()
    handle = ckptstore.save(state, out, compression="zstd")
    stall = time.perf_counter() - t0
    with torch.no_grad():  # training goes on; the checkpoint keeps the snapshot
        for p in model.parameters():
            p.add_(1.0)
    result = handle.wait()
    print(f"saved {result.logical_bytes / 1e6:.1f} MB as {result.stored_bytes / 1e6:.1f} MB "
          f"to {out}: training blocked {stall * 1e3:.1f} ms, durable after "
          f"{result.total_seconds * 1e3:.0f} ms")
    rc = subprocess.call([sys.executable, "-m", "ckptstore", "fsck", out])
    if rc != 0:
        return rc
    back = ckptstore.load(out)
    same = all(torch.equal(back["optim"]["state"][i]["exp_avg"], state["optim"]["state"][i]["exp_avg"])
               for i in state["optim"]["state"])
    moved = not torch.equal(back["model"]["0.weight"], model.state_dict()["0.weight"])
    print(f"loaded back: optimizer state identical={same}, snapshot unaffected by later updates={moved}")
    return 0 if same and moved else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo-ckpt"))
