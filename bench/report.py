"""Markdown tables for every mode, and the targets as PASS/MISS lines."""
from __future__ import annotations

from typing import Any

from bench.targets import label
from bench.timing import fmt_size


def cell(d: dict[str, Any] | None, fmt: str = ".3f") -> str:
    """``median (min–max)``, or an em dash when absent."""
    if not d:
        return "—"
    if d.get("n", 1) == 1 or d["min"] == d["max"]:
        return f"{d['median']:{fmt}}"
    return f"{d['median']:{fmt}} ({d['min']:{fmt}}–{d['max']:{fmt}})"


def _mib(mem: dict[str, float] | None, key: str) -> str:
    return f"{mem[key] / 2**20:.0f}" if mem and mem.get(key) else "—"


def _added(mem: dict[str, float] | None) -> str:
    """Memory the save added over what the process tree held just before it."""
    if not mem or not mem.get("peak_tree_pss"):
        return "—"
    return f"{(mem['peak_tree_pss'] - mem['pss_before']) / 2**20:.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(results: list[dict[str, Any]]) -> str:
    """One row per dtype x size: limits and the headline ratios of ckptstore (none)."""
    rows = []
    peers: list[str] = []
    for res in results:
        peers += [k for k, m in res["measurements"].items() if m["kind"] == "peer" and k not in peers]
    for res in results:
        ms, r = res["measurements"], res["ratios"].get("ckptstore none", {})
        cp = ms.get("memcpy") or ms.get("pinned D2H") or {}
        none = ms.get("ckptstore none", {})
        rows.append([res["dtype"], label(res), cell(cp.get("gbps"), ".2f"),
                     cell(ms.get("disk", {}).get("gbps"), ".2f"), cell(none.get("stall"), ".3f"),
                     cell(none.get("gbps"), ".2f"), cell(r.get("stall/memcpy"), ".2f"),
                     cell(r.get("durable/disk_write"), ".2f")]
                    + [cell(r.get(f"vs {p}"), ".2f") for p in peers])
    return ("ckptstore `compression=\"none\"`; ratios are medians of per-repeat paired ratios "
            "(min–max); `vs peer` > 1 means ckptstore reaches durable faster\n\n"
            + table(["dtype", "size", "memcpy GB/s", "disk write GB/s", "stall s", "durable GB/s",
                     "stall ÷ memcpy", "durable ÷ disk write"] + [f"vs {p}" for p in peers], rows))


def write_tables(results: list[dict[str, Any]]) -> str:
    parts = ["### summary", write_summary(results)]
    for res in results:
        ms, rt = res["measurements"], res["ratios"]
        parts.append(f"### write — {res['dtype']} {label(res)}: {res['state']}")
        if res.get("engine_unavailable"):
            parts.append(f"ckptstore not measured: {res['engine_unavailable']}")
        rows = []
        for name, m in ms.items():
            r = rt.get(name, {})
            stored = f"{m['ratio_stored']:.3f}" if "ratio_stored" in m else "—"
            rows.append([name, m["kind"], cell(m.get("stall")), cell(m.get("total")), cell(m.get("gbps"), ".2f"),
                         cell(r.get("durable/disk_write"), ".2f"), cell(r.get("stall/memcpy"), ".2f"), stored,
                         _added(m.get("memory")), _mib(m.get("memory"), "peak_tree_pss")])
        parts.append(table(["what", "kind", "stall s", "durable s", "GB/s", "÷ disk write", "stall ÷ memcpy",
                            "stored", "+MiB during save", "peak MiB (tree PSS)"], rows))
        disk = ms.get("disk")
        if disk:
            res_drop = [s.get("resident_after_drop") for s in disk["samples"]]
            parts.append(f"disk read: cold {cell(disk.get('read_cold'))} s, warm {cell(disk.get('read_warm'))} s "
                         f"(resident after drop: {', '.join(f'{x:.2f}' for x in res_drop if x is not None)})")
        peer_rows = []
        for name, r in rt.items():
            vs = {k[3:]: v for k, v in r.items() if k.startswith("vs ")}
            if vs:
                peer_rows.append([name] + [cell(vs[p], ".2f") for p in vs])
        if peer_rows:
            peers = [k[3:] for k in next(r for r in rt.values() if any(x.startswith("vs ") for x in r))
                     if k.startswith("vs ")]
            parts.append("durable throughput, ckptstore ÷ peer (> 1: ckptstore faster)\n\n"
                         + table(["ckptstore mode"] + peers, peer_rows))
    return "\n\n".join(parts)


def load_tables(results: list[dict[str, Any]]) -> str:
    parts = []
    for res in results:
        parts.append(f"### load — {res['dtype']} {label(res)}: {res['state']}")
        if res.get("engine_unavailable"):
            parts.append(f"ckptstore not measured: {res['engine_unavailable']}")
        if res.get("roundtrip_identical"):
            parts.append("round trip bit-identical: " + ", ".join(f"{k}: {v}" for k, v in res["roundtrip_identical"].items()))
        rows = []
        for name, m in res["measurements"].items():
            r = res["ratios"].get(name, {})
            rows.append([name, cell(m.get("cold")), cell(m.get("cold_gbps"), ".2f"), cell(m.get("warm")),
                         cell(m.get("warm_gbps"), ".2f"), cell(r.get("cold/disk_cold_read"), ".2f"),
                         cell(r.get("warm/disk_warm_read"), ".2f"), cell(r.get("warm/memcpy"), ".2f")])
        parts.append(table(["what", "cold s", "cold GB/s", "warm s", "warm GB/s", "cold ÷ disk cold read",
                            "warm ÷ disk warm read", "warm ÷ memcpy"], rows))
    return "\n\n".join(parts)


def compress_tables(results: list[dict[str, Any]]) -> str:
    rows = []
    for res in results:
        for kind, k in res["kinds"].items():
            rows.append([res["dtype"], label(res), kind]
                        + [f"{k[c]['plain']:.3f} / {k[c]['grouped']:.3f}" for c in ("zstd-1", "zstd-3", "lz4")]
                        + [f"{k['zstd-1']['exponent_plane_only']:.3f}", f"{k['entropy0_grouped']:.3f}",
                           " ".join(f"{x:.2f}" for x in k["zstd-1"]["per_plane"]),
                           f"{k['zstd-1']['plain_gbps']:.2f} / {k['zstd-1']['grouped_gbps']:.2f}"])
        o = res["overall"]
        rows.append([res["dtype"], label(res), "**all**"]
                    + [f"{o[c]['plain']:.3f} / {o[c]['grouped']:.3f}" for c in ("zstd-1", "zstd-3", "lz4")]
                    + [f"{o['zstd-1']['exponent_plane_only']:.3f}", "", "", ""])
    return ("stored fraction of raw bytes, plain / byte-grouped (lower is better)\n\n"
            + table(["dtype", "size", "kind", "zstd-1", "zstd-3", "lz4", "zstd-1 exp. plane only",
                     "order-0 bound", "zstd-1 per plane (low→high byte)", "zstd-1 GB/s plain / grouped"], rows)
            + "\n\n" + engine_codec_table(results))


def engine_codec_table(results: list[dict[str, Any]]) -> str:
    """The engine's codec as the engine runs it: GB/s per core (thread CPU time) and wall."""
    rows = []
    for res in results:
        ec = res.get("engine_codec")
        if not ec:
            continue
        if ec.get("unavailable"):
            rows.append([res["dtype"], label(res), f"not measured: {ec['unavailable']}", "", "", "", "", ""])
            continue
        rows.append([res["dtype"], label(res), f"{ec['codec']}-{ec['level']}",
                     f"{ec['chunks']} of ≤ {fmt_size(ec['chunk_bytes'])}",
                     f"{ec['stored']:.4f}", cell(ec["encode_gbps"], ".2f"), cell(ec["decode_gbps"], ".2f"),
                     f"{cell(ec['encode_wall_gbps'], '.2f')} / {cell(ec['decode_wall_gbps'], '.2f')}"])
    return ("engine codec (ckptstore.pipeline.codec on every tensor cut into the engine's chunks, one thread; "
            "GB/s/core = bytes / the thread's CPU time)\n\n"
            + table(["dtype", "size", "codec", "chunks", "stored", "encode GB/s/core", "decode GB/s/core",
                     "wall GB/s encode / decode"], rows))


def train_tables(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        ck = [s for s in r["segments"] if s["which"] == "ckpt"]
        stall = ck[0]["stall"] if ck else None
        rows.append([r["device"], r["dtype"], fmt_size(r["size"]), r["mode"], str(r["every"]), str(r["steps"]),
                     cell(r["mean_step_base"], ".4f"), cell(r.get("mean_step_ckpt"), ".4f"),
                     cell(r.get("overhead") and {k: (v * 100 if k != "n" else v) for k, v in r["overhead"].items()},
                          ".1f"), cell(stall, ".3f")])
    return table(["device", "dtype", "state", "ckptstore mode", "every", "steps/segment", "step s (no ckpt)",
                  "step s (ckpt)", "overhead %", "save stall s (first ckpt segment)"], rows)


def targets_md(targets: list[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        if t["pass"] is None:
            lines.append(f"- **n/a** {t['target']} [{t['where']}]: {t['note']}")
            continue
        verdict = "PASS" if t["pass"] else "MISS"
        how = f"{abs(t['margin']) * 100:.0f}% {'headroom' if t['pass'] else 'short'}"
        note = f" — {t['note']}" if t.get("note") else ""
        lines.append(f"- **{verdict}** {t['target']} [{t['where']}]: {t['value']:.3f} "
                     f"(target {t['op']} {t['threshold']:g}; {how}){note}")
    return "\n".join(lines)


TABLES = {"write": write_tables, "load": load_tables, "compress": compress_tables, "train": train_tables}


def render(report: dict[str, Any]) -> str:
    """The whole Markdown report of one run."""
    mode = report["mode"]
    head = [f"## bench {mode}", f"`{report['command']}`", "",
            f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
            f"{report['machine']['ram_gib']} GiB, torch {report['machine']['torch']}; "
            f"cache drop: {report.get('cache_drop', '—')}"]
    if mode not in TABLES:  # a mode that registers its own tables (objstore) when imported
        import importlib

        importlib.import_module(f"bench.{mode}")
    body = TABLES[mode](report["results"])
    return "\n".join(head) + "\n\n" + body + "\n\n#### targets\n\n" + (targets_md(report["targets"]) or "(none)") + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report REPORT.json`` — re-render a saved report as Markdown."""
    import json
    import sys
    from pathlib import Path

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m bench.report REPORT.json", file=sys.stderr)
        return 2
    from bench.targets import TARGETS

    rep = json.loads(Path(args[0]).read_text())
    rep["targets"] = TARGETS[rep["mode"]](rep["results"])  # re-checked with the current rules
    print(render(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
