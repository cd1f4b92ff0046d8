"""Entry point: ``python -m trainer [flags]``, ``torchrun ... -m trainer [flags]``,
``python -m trainer plot RUN_DIR [--out PNG]``, ``python -m trainer demo [--nproc N]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, parse_config


def _plot(argv: list[str]) -> int:
    from .plot import plot_run

    parser = argparse.ArgumentParser(prog="python -m trainer plot")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate, then train, plot or search the batch size."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return _plot(argv[1:])
    if argv[:1] == ["demo"]:
        from .demo import main as demo

        return demo(argv[1:])
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s")
    try:
        cfg = parse_config(argv).validate(int(os.environ.get("WORLD_SIZE", 1)))
    except (ConfigError, OSError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from .train import setup, teardown, train

    if cfg.find_batch_size:
        from .batch_size import find_batch_size

        ctx = setup(cfg)
        try:
            print(f"largest batch that fits: {find_batch_size(cfg, ctx)}")
        except RuntimeError as exc:
            print(f"find-batch-size: {exc}", file=sys.stderr)
            return 2
        finally:
            teardown(ctx)
        return 0
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
