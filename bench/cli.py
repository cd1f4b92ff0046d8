"""Command line: parse options, run one mode, print Markdown, write JSON and a plot."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench import compress, load, objstore, report, targets, train, write
from bench.common import Options, machine
from bench.limits import CacheDropper
from bench.timing import parse_sizes

DEFAULT_SIZES = {"write": "64M,256M", "load": "64M,256M", "compress": "64M", "train": "16M", "objstore": "256M",
                 "meta": "1", "recovery": "256M,1G"}
DEFAULT_MODES = {"write": "all", "load": "none,zstd-1+bg", "compress": "all", "train": "none",
                 "objstore": "s3,gcs", "meta": "all", "recovery": "all"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("mode", choices=["write", "load", "compress", "train", "objstore", "meta",
                                       "recovery"])
    p.add_argument("--size", help="comma-separated sizes, e.g. 64M,256M,1G (state bytes)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp32,bf16")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repeats per measurement")
    p.add_argument("--json", type=Path, help="write the full results here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here (write mode)")
    p.add_argument("--dir", type=Path, default=Path("bench/out/work"), help="where checkpoints are written")
    p.add_argument("--modes", help="ckptstore modes: all or e.g. none,lz4,zstd-1+bg")
    p.add_argument("--peers", default="all", help="all, none or e.g. torch.save,safetensors")
    p.add_argument("--staging-budget", help="pass staging_budget=BYTES to ckptstore.save")
    p.add_argument("--drop-caches", action="store_true",
                   help="use /proc/sys/vm/drop_caches (system-wide!) instead of per-file fadvise")
    p.add_argument("--gpu", action="store_true", help="CUDA tensors: pinned D2H limit, ckptstore CUDA path")
    p.add_argument("--tensors", type=int, help="write: a state of N equal tensors instead of the "
                   "GPT layout (per-tensor overhead), e.g. --size 320M --tensors 5000")
    p.add_argument("--ranks", default="8,64,256,1024", help="meta: simulated world sizes")
    p.add_argument("--every", type=int, default=20, help="train: save every N steps")
    p.add_argument("--steps", type=int, default=60, help="train: steps per measured segment")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def options(a: argparse.Namespace) -> Options:
    from bench.timing import parse_size

    dtypes = [d.strip() for d in a.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in ("fp32", "bf16")]
    if bad:
        raise SystemExit(f"--dtype: unknown {bad}; use fp32, bf16 or fp32,bf16")
    if a.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    return Options(sizes=parse_sizes(a.size or DEFAULT_SIZES[a.mode]), dtypes=dtypes, repeat=a.repeat,
                   dir=a.dir, modes=a.modes or DEFAULT_MODES[a.mode], peers=a.peers,
                   drop_caches=a.drop_caches, gpu=a.gpu,
                   staging_budget=parse_size(a.staging_budget) if a.staging_budget else None,
                   every=a.every, steps=a.steps,
                   extra={**({"tensors": a.tensors} if a.tensors else {}),
                          "ranks": [int(x) for x in a.ranks.split(",") if x.strip()]})


def require_cuda() -> None:
    """Fail clearly, before any work, when --gpu is asked for without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device, but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). "
                         "Run without --gpu to measure the CPU path.")


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the mode and return the report dict (also used by tests)."""
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(message)s", stream=sys.stderr)
    opt = options(a)
    if opt.gpu:
        require_cuda()
    opt.dir.mkdir(parents=True, exist_ok=True)
    dropper = CacheDropper(opt.drop_caches)
    t0 = time.time()
    if a.mode == "write":
        results = write.run(opt, dropper)
    elif a.mode == "load":
        results = load.run(opt, dropper)
    elif a.mode == "compress":
        results = compress.run(opt)
    elif a.mode == "objstore":  # --modes: the stores, s3,gcs
        results = objstore.run(opt)
    elif a.mode == "meta":
        from bench import meta

        results = meta.run(opt)
    elif a.mode == "recovery":
        from bench import recovery

        results = recovery.run(opt)
    else:
        results = train.run(opt)
    cmd = "python -m bench " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    rep: dict[str, Any] = {
        "mode": a.mode, "command": cmd, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
        "seconds": time.time() - t0, "machine": machine(opt.dir), "cache_drop": dropper.method,
        "options": {"sizes": opt.sizes, "dtypes": opt.dtypes, "repeat": opt.repeat, "modes": opt.modes,
                    "peers": opt.peers, "gpu": opt.gpu, "staging_budget": opt.staging_budget,
                    "every": opt.every, "steps": opt.steps},
        "results": results,
    }
    rep["targets"] = targets.TARGETS[a.mode](results)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rep, indent=1, default=str))
    if a.plot and a.mode == "write":
        from bench import plot
        plot.plot_write(rep, a.plot)
    return rep


def main(argv: list[str] | None = None) -> int:
    rep = run(argv)
    print(report.render(rep))
    return 0
