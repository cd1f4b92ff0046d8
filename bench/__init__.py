"""ckptstore benchmarks: ``python -m bench write|load|compress|train``.

Measures ckptstore against the hardware limits (memcpy, fsync'd disk write, cold and
warm read) and against peers (torch.save, safetensors, torch.distributed.checkpoint),
on a realistic trained-GPT + AdamW state, with interleaved repeats reported as
medians with min-max and as ratios. See docs/benchmarks.md.
"""
