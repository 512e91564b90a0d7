"""results.md and chart.png of scripts/bench.py: one row per job, one column per target, then
each daxfs mode's ratio to tmpfs and to every other target (the peers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DAXFS_MODES = ("daxfs", "daxfs-dax", "daxfs-writeback", "daxfs-uring")
SHORT = {"daxfs-dax": "dax", "daxfs-writeback": "wb", "daxfs-uring": "uring",
         "passthrough_ll": "ll", "passthrough_ll-writeback": "ll-wb",
         "pyfuse3-passthroughfs": "py"}


COLORS = {"daxfs": "C0", "daxfs-dax": "C1", "passthrough_ll": "C2",     # the same in every
          "passthrough_ll-writeback": "C3", "pyfuse3-passthroughfs": "C4",  # run's chart
          "daxfs-writeback": "C6", "daxfs-uring": "C7"}


def short(name: str) -> str:
    return SHORT.get(name, name)


def ratio_columns(names: list[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) pairs: each daxfs mode / every target that is not daxfs;
    without daxfs, each target / tmpfs."""
    modes = [n for n in names if n in DAXFS_MODES]
    if modes:
        return [(m, o) for m in modes for o in names if o not in DAXFS_MODES]
    return [(n, "tmpfs") for n in names if n != "tmpfs" and "tmpfs" in names]


def value(results, target, row, key="value"):
    return results[target]["jobs"].get(row, {}).get(key)


def fmt(v, metric=""):
    if v is None:
        return "err"
    if metric == "IOPS":
        return f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def markdown(info: dict, cfg: dict, results: dict, jobs) -> str:
    names = list(results)
    pairs = ratio_columns(names)
    size = cfg["size"]
    size_s = f"{size >> 30} GiB" if size % (1 << 30) == 0 else f"{size >> 20} MiB"
    lines = [f"# daxfs benchmark {info['date']}", "",
             f"- machine: {info['host']}, {info['nproc']} CPUs ({info['cpu']}), "
             f"{info['memtotal_GiB']} GiB RAM, kernel {info['kernel']}, {info['fio']}, "
             f"libfuse {info.get('libfuse', '?')}, Python {info['python']}; load average "
             f"{info.get('loadavg_start', '?')} at the start, {info.get('loadavg_end', '?')} at "
             "the end (the machine may be shared: compare ratios within this run); memory "
             f"available {info.get('memavail_start_GiB', '?')} GiB at the start, "
             f"{info.get('memavail_end_GiB', '?')} GiB at the end",
             f"- mode: {cfg['mode']}, {cfg['runtime']} s per job, median of {cfg['runs']} "
             f"run(s); fio psync on one {size_s} file; jobs run in this order on each target "
             "with nothing warming or dropping the page cache between them (seqW deletes the "
             "file first; only the extra row warms it)",
             *(f"- {n}: {r['desc']} ({r['fstype']})" if r.get("desc") else
               f"- {n}: not run (see Errors)" for n, r in results.items()), "",
             "| job | unit | " + " | ".join(names)
             + "".join(f" | {short(a)}/{short(b)}" for a, b in pairs) + " |",
             "|---|---|" + "---:|" * (len(names) + len(pairs))]
    for job in jobs:
        vals = [fmt(value(results, n, job.name), job.metric) for n in names]
        ratios = []
        for a, b in pairs:
            va, vb = value(results, a, job.name), value(results, b, job.name)
            ratios.append(f"{va / vb:.2f}" if va and vb else "–")
        lines.append(f"| {job.label} | {job.metric} | " + " | ".join(vals + ratios) + " |")
    used = {n for pair in pairs for n in pair}
    abbrev = [f"{v} = {k}" for k, v in SHORT.items() if k in used]
    if abbrev:
        lines += ["", "Ratio columns: " + ", ".join(abbrev) + "."]

    lines += ["", "| other | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def row(label, get):  # rows nobody has (e.g. mount without daxfs) are left out
        cells = []
        for n in names:
            try:
                cells.append(get(results[n]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("–")
        if set(cells) != {"–"}:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("COW storm clone / original (IOPS ratio)",
        lambda r: f"{r['jobs']['cow-storm']['value'] / r['jobs']['cow-storm-orig']['value']:.2f}")
    row(f"layout {size_s}, when seqW left no whole file (MB/s)",
        lambda r: f"{r['layout_MBps']:.0f}")
    row(f"cp {size_s} (s)", lambda r: f"{r['copy']['cp_s']:.3f}")
    row(f"cat \\| cat > {size_s} (s)", lambda r: f"{r['copy']['cat_s']:.3f}")
    row("cp / cat time", lambda r: f"{r['copy']['cp_over_cat']:.3f}")
    row("create files (/s)", lambda r: f"{r['mount']['create_per_s']:.0f}")
    row("mount, N files (s)", lambda r: f"{r['mount']['mount_s']:.3f} (N={r['mount']['nfiles']})")
    row("ls top dir (s)", lambda r: f"{r['mount']['ls_s']:.3f} ({r['mount']['ls_entries']} entries)")
    row("umount (s)", lambda r: f"{r['mount']['umount_s']:.3f}")

    cpu_names = [n for n in names
                 if any(value(results, n, j.name, "daemon_cpu_us_per_op") is not None
                        for j in jobs)]
    if cpu_names:
        lines += ["", "Daemon CPU per fio operation (µs: utime + stime of the daemon over the "
                  "job / fio's I/O count; for mmap jobs an operation is a page touch, not a "
                  "request)", "",
                  "| job | " + " | ".join(cpu_names) + " |", "|---|" + "---:|" * len(cpu_names)]
        for job in jobs:
            cells = [value(results, n, job.name, "daemon_cpu_us_per_op") for n in cpu_names]
            lines.append(f"| {job.name} | "
                         + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")

    errors = [(n, k, e) for n, r in results.items() for k, e in r["errors"].items()]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- **{n} / {k}**: {' '.join(str(e).split())}" for n, k, e in errors]
    return "\n".join(lines) + "\n"


def chart(results: dict, jobs, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib not installed (pip install -e '.[bench]')"
    others = [n for n in results if n != "tmpfs"]
    if "tmpfs" not in results or not others:
        return "chart skipped: needs the tmpfs baseline and one other target"
    x = np.arange(len(jobs))
    width = 0.84 / len(others)
    fig, ax = plt.subplots(figsize=(max(9, len(jobs) * 1.1), 5))
    for i, n in enumerate(others):
        ys = [(value(results, n, j.name) or 0) / (value(results, "tmpfs", j.name) or np.inf)
              for j in jobs]
        ax.bar(x + (i - (len(others) - 1) / 2) * width, ys, width, label=n,
               color=COLORS.get(n, f"C{5 + i}"),
               hatch="//" if n in DAXFS_MODES else None, edgecolor="white", linewidth=0.3)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, [j.name for j in jobs], rotation=30, ha="right")
    ax.set_ylabel("throughput / tmpfs (log; missing bar = error)")
    ax.set_title("each target relative to tmpfs, same run (higher is better)")
    ax.grid(axis="y", which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize="small", ncols=min(len(others), 6), loc="upper center",
              bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart: {path}"
