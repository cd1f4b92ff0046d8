"""Realistic benchmark state: a trained GPT plus AdamW moments, at any byte size.

A small GPT is trained for a few hundred steps (seconds on two cores). A state of
the requested size is then laid out as a wider, deeper GPT whose every tensor is
filled with values drawn from the trained tensors of the same role (weights from
weights, ``exp_avg`` from ``exp_avg``, ...), with a tiny multiplicative jitter so
no two elements are bit-identical copies. The value distributions, and hence the
per-byte-plane entropy that decides compression, are those of trained values;
there are no long repeats a compressor could exploit unrealistically.

Both the trained model and the generated states are cached as safetensors files
(never pickle) in ``cache_dir()``.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench.model import GPT, GPTConfig, batches, corpus, make_optimizer

STATE_VERSION = "v1"
TRAIN_STEPS = int(os.environ.get("CKPTSTORE_BENCH_TRAIN_STEPS", "300"))  # tests lower it
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CHUNK = 1 << 24  # elements generated per step, bounds temporaries


def cache_dir() -> Path:
    """Where trained and generated states are cached (``CKPTSTORE_BENCH_CACHE``)."""
    default = Path(__file__).resolve().parent / "out" / "cache"
    d = Path(os.environ.get("CKPTSTORE_BENCH_CACHE", default))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class BenchState:
    """A flat map of tensors ("/"-separated paths) plus the nested view peers save."""

    flat: dict[str, torch.Tensor]
    dtype: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat.values())

    def tree(self) -> dict[str, Any]:
        """Nested state dict (model, optim state + param_groups, step) sharing tensors."""
        model: dict[str, torch.Tensor] = {}
        ostate: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.flat.items():
            parts = key.split("/")
            if parts[0] == "model":
                model[parts[1]] = t
            else:  # optim/state/<param>/<field>
                ostate.setdefault(parts[2], {})[parts[3]] = t
        groups = [{"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                   "params": sorted(ostate)}]
        return {"model": model, "optim": {"state": ostate, "param_groups": groups},
                "step": int(self.info.get("train_steps", TRAIN_STEPS))}

    def to(self, device: str) -> "BenchState":
        """Copy onto ``device`` (used by ``--gpu``)."""
        return BenchState({k: v.to(device) for k, v in self.flat.items()}, self.dtype, dict(self.info))


def _role(name: str) -> str:
    """``h.3.c_attn.weight`` -> ``c_attn.weight``: tensors sharing a role share a pool."""
    return re.sub(r"^h\.\d+\.", "", name)


def train_small(steps: int | None = None, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Train the small GPT; return {model|exp_avg|exp_avg_sq/<name>: tensor} and info."""
    steps = TRAIN_STEPS if steps is None else steps
    torch.manual_seed(seed)
    cfg = GPTConfig()
    model = GPT(cfg)
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(seed)
    it = batches(corpus(), 16, cfg.block_size, gen)
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for g in opt.param_groups:  # short warmup, then constant: values leave init quickly
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 30)
        x, y = next(it)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        out[f"model/{name}"] = p.detach().clone()
        st = opt.state[p]
        out[f"exp_avg/{name}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].clone()
    info = {"steps": str(steps), "final_loss": f"{loss.item():.4f}",
            "train_seconds": f"{time.perf_counter() - t0:.1f}", "config": repr(cfg)}
    return out, info


def trained_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The trained small model and moments, from the cache or freshly trained."""
    path = cache_dir() / f"trained_{STATE_VERSION}_{TRAIN_STEPS}.safetensors"
    if not path.exists():
        tensors, info = train_small()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=info)
        os.replace(tmp, path)
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor into private (anonymous) memory, in file order."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k).clone()
    _drop_file_cache(path)
    return out, meta


def _drop_file_cache(path: Path) -> None:
    """Keep the cache file from occupying the page cache during measurements."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def layout(nbytes: int, dtype: str) -> tuple[int, int, int, list[tuple[str, tuple[int, ...]]]]:
    """Choose (width, layers, vocab, [(param name, shape)]) whose state is ~``nbytes``.

    State bytes = 3 x params x element size (weights, exp_avg, exp_avg_sq) + 4 bytes
    of fp32 ``step`` per parameter. Width grows with size so tensor sizes stay
    realistic; the token embedding absorbs the remainder.
    """
    eb = DTYPES[dtype].itemsize
    params_target = nbytes // (3 * eb)
    d = 64
    for cand in (128, 256, 512, 1024, 2048, 4096):
        if 48 * cand * cand <= params_target:
            d = cand
    block = 1024
    per_layer = 12 * d * d + 13 * d
    fixed = block * d + 2 * d + 256 * d
    n_layer = max(0, (params_target - fixed) // per_layer)
    vocab = max(256, (params_target - n_layer * per_layer - block * d - 2 * d) // d)
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d)), ("wpe.weight", (block, d))]
    for i in range(n_layer):
        for name, shape in (("ln_1.weight", (d,)), ("ln_1.bias", (d,)),
                            ("c_attn.weight", (3 * d, d)), ("c_attn.bias", (3 * d,)),
                            ("attn_proj.weight", (d, d)), ("attn_proj.bias", (d,)),
                            ("ln_2.weight", (d,)), ("ln_2.bias", (d,)),
                            ("c_fc.weight", (4 * d, d)), ("c_fc.bias", (4 * d,)),
                            ("mlp_proj.weight", (d, 4 * d)), ("mlp_proj.bias", (d,))):
            shapes.append((f"h.{i}.{name}", shape))
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return d, n_layer, vocab, shapes


def _pools(trained: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """(kind, role) -> all trained fp32 values of that role, flattened."""
    acc: dict[tuple[str, str], list[torch.Tensor]] = {}
    for key, t in trained.items():
        kind, name = key.split("/", 1)
        acc.setdefault((kind, _role(name)), []).append(t.reshape(-1).float())
    return {k: torch.cat(v) for k, v in acc.items()}


def _fill(out: torch.Tensor, pool: torch.Tensor, gen: torch.Generator) -> None:
    """Fill ``out`` with values resampled from ``pool`` and jittered by ~1e-3 relative."""
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        n = min(_CHUNK, flat.numel() - start)
        idx = torch.randint(pool.numel(), (n,), generator=gen)
        jitter = torch.rand(n, generator=gen).mul_(2e-3).add_(1.0 - 1e-3)
        flat[start : start + n].copy_(pool[idx].mul_(jitter))


def generate(nbytes: int, dtype: str, seed: int = 1) -> BenchState:
    """Generate a state of about ``nbytes`` in ``dtype`` from the trained pools."""
    trained, tinfo = trained_tensors()
    pools = _pools(trained)
    d, n_layer, vocab, shapes = layout(nbytes, dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + nbytes)
    tdt = DTYPES[dtype]
    flat: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        t = torch.empty(shape, dtype=tdt)
        _fill(t, pools[("model", _role(name))], gen)
        flat[f"model/{name}"] = t
    for name, shape in shapes:
        steps = torch.tensor(float(TRAIN_STEPS))
        flat[f"optim/state/{name}/step"] = steps
        for kind in ("exp_avg", "exp_avg_sq"):
            t = torch.empty(shape, dtype=tdt)
            _fill(t, pools[(kind, _role(name))], gen)
            if kind == "exp_avg_sq":
                t.abs_()
            flat[f"optim/state/{name}/{kind}"] = t
    info = {"width": d, "layers": n_layer, "vocab": vocab, "train_steps": TRAIN_STEPS,
            "train_final_loss": tinfo.get("final_loss"), "version": STATE_VERSION}
    return BenchState(flat, dtype, info)


def small_state(nbytes: int, dtype: str, n: int, seed: int = 2) -> BenchState:
    """``n`` equal tensors of about ``nbytes / n`` bytes each (values drawn from the
    trained weights): where per-tensor overhead shows."""
    trained, _ = trained_tensors()
    pools = _pools(trained)
    pool = max((v for (kind, _), v in pools.items() if kind == "model"), key=lambda v: v.numel())
    tdt = DTYPES[dtype]
    each = max(1, nbytes // n // tdt.itemsize)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + nbytes + n)
    flat: dict[str, torch.Tensor] = {}
    for i in range(n):
        t = torch.empty(each, dtype=tdt)
        _fill(t, pool, gen)
        flat[f"model/p{i:05d}"] = t
    return BenchState(flat, dtype, {"kind": "small", "tensors": n, "train_steps": TRAIN_STEPS})


def load_state(nbytes: int, dtype: str) -> BenchState:
    """The cached state of ``nbytes``/``dtype``, generating and caching it if needed."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    path = cache_dir() / f"state_{STATE_VERSION}_{TRAIN_STEPS}_{dtype}_{nbytes}.safetensors"
    if path.exists():
        flat, meta = _read_safetensors(path)
        info: dict[str, Any] = {k: _num(v) for k, v in meta.items()}
        return BenchState(flat, dtype, info)
    st = generate(nbytes, dtype)
    tmp = path.with_suffix(".tmp")
    save_file(st.flat, str(tmp), metadata={k: str(v) for k, v in st.info.items()})
    os.replace(tmp, path)
    _drop_file_cache(path)
    return st


def _num(v: str) -> Any:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def iter_role_tensors(st: BenchState) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(kind, role, tensor) for every float tensor: kind is weights|exp_avg|exp_avg_sq."""
    for key, t in st.flat.items():
        parts = key.split("/")
        if parts[0] == "model":
            yield "weights", _role(parts[1]), t
        elif parts[-1] in ("exp_avg", "exp_avg_sq"):
            yield parts[-1], _role(parts[2]), t


def describe(st: BenchState) -> str:
    """One line: bytes, tensors and GPT shape."""
    i = st.info
    if i.get("kind") == "small":
        each = st.nbytes / max(1, len(st.flat))
        return f"{st.nbytes / 1e6:.1f} MB {st.dtype}, {len(st.flat)} tensors of {each / 1024:.0f} KiB"
    return (f"{st.nbytes / 1e6:.1f} MB {st.dtype}, {len(st.flat)} tensors "
            f"(GPT width {i.get('width')}, {i.get('layers')} layers, vocab {i.get('vocab')}, "
            f"values from a {i.get('train_steps')}-step trained model)")


def total_params(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    """Parameter count of a layout."""
    return sum(math.prod(s) for _, s in shapes)
