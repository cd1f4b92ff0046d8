"""PNG plot of a write sweep: throughput and stall against size, peers and limits as lines."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.timing import fmt_size  # noqa: E402

STYLE = {"limit": dict(linestyle="--", linewidth=1.5), "peer": dict(linestyle="-", linewidth=1, alpha=0.8),
         "ckptstore": dict(linestyle="-", linewidth=2.5)}
COLORS = {"memcpy": "black", "pinned D2H": "black", "disk": "dimgray", "torch.save": "tab:blue",
          "safetensors": "tab:green", "dcp.save": "tab:purple", "dcp.save(t=2)": "tab:pink",
          "dcp.async_save": "tab:olive", "ckptstore none": "tab:red", "ckptstore zstd-1+bg": "tab:orange",
          "ckptstore lz4": "tab:brown"}
PLOTTED_MODES = ("ckptstore none", "ckptstore zstd-1+bg", "ckptstore lz4")  # the rest: tables only


def _series(results: list[dict[str, Any]], dtype: str, key: str) -> dict[str, tuple[list[int], list[float], str]]:
    """name -> (sizes, medians of ``key``, kind) across the sweep."""
    out: dict[str, tuple[list[int], list[float], str]] = {}
    for res in sorted((r for r in results if r["dtype"] == dtype), key=lambda r: r["size"]):
        for name, m in res["measurements"].items():
            v = m.get(key)
            if not v or (m["kind"] == "ckptstore" and name not in PLOTTED_MODES):
                continue
            xs, ys, _ = out.setdefault(name, ([], [], m["kind"]))
            xs.append(res.get("requested_size", res["size"]))
            ys.append(v["median"])
    return out


def plot_write(report: dict[str, Any], path: Path) -> Path:
    """Write the PNG for a ``write`` report; one row of two panels per dtype."""
    results = report["results"]
    dtypes = sorted({r["dtype"] for r in results})
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(12, 4.2 * len(dtypes)), squeeze=False, dpi=80)
    for row, dtype in zip(axes, dtypes):
        thr, stall = row
        for name, (xs, ys, kind) in _series(results, dtype, "gbps").items():
            label = "disk fsync'd write" if name == "disk" else name
            thr.plot(xs, ys, marker="o", label=label, color=COLORS.get(name), **STYLE[kind])
        for name, (xs, ys, kind) in _series(results, dtype, "stall").items():
            stall.plot(xs, ys, marker="o", label=name, color=COLORS.get(name), **STYLE[kind])
        cp = _series(results, dtype, "total").get("memcpy") or _series(results, dtype, "total").get("pinned D2H")
        if cp:
            stall.plot(cp[0], cp[1], marker="o", label="memcpy (preallocated)", color="black", **STYLE["limit"])
        thr.set(title=f"{dtype}: time-to-durable throughput", ylabel="GB/s (logical)", xscale="log", yscale="log")
        stall.set(title=f"{dtype}: training stall per save", ylabel="seconds", xscale="log", yscale="log")
        for ax in (thr, stall):
            xs = sorted({r.get("requested_size", r["size"]) for r in results if r["dtype"] == dtype})
            ax.set_xticks(xs, [fmt_size(x) for x in xs])
            ax.minorticks_off()
            ax.set_xlabel("state size")
            ax.grid(alpha=0.3)
        thr.legend(fontsize=7, ncol=2)
        stall.legend(fontsize=7, ncol=2)
    fig.suptitle(f"bench write — {report['machine']['cpu']}, {report['machine']['cores']} cores "
                 f"(medians; dashed = hardware limits, thick = ckptstore)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.plot REPORT.json OUT.png`` — re-plot a saved write report."""
    import json
    import sys

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m bench.plot REPORT.json OUT.png", file=sys.stderr)
        return 2
    plot_write(json.loads(Path(args[0]).read_text()), Path(args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
