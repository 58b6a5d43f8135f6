"""PNG plots of the figures in results/*.json (whatever has been run): Envoy memory and pushed
bytes, full against lazy against ideal; xdsproxy's memory and fan-out time against M."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.lazy import mix
from benchmarks.report import load_json, results_dir

CASES = ("full", "lazy", "ideal")


def lazy_plot(points: list[dict]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for share, style in (("no TCP", "-"), ("1/10 TCP", "--"), ("realistic", ":")):
        mine = [p for p in points if mix(p) == share]
        for n, k in enumerate(sorted({p["k"] for p in mine})):
            chosen = sorted((p for p in mine if p["k"] == k), key=lambda p: p["services"])
            sizes = [p["services"] for p in chosen]
            # The full push does not depend on k: drawn once.
            for case in CASES if n == 0 else ("lazy", "ideal"):
                label = f"{case} ({share})" if case == "full" else f"{case} k={k} ({share})"
                axes[0].plot(sizes, [p[case]["allocated_mb"] for p in chosen], style, marker="o",
                             label=label)  # fmt: skip
                axes[1].plot(sizes, [p[case]["cds_eds_rds_bytes"] for p in chosen], style,
                             marker="o", label=label)  # fmt: skip
    for ax, title in zip(axes, ("Envoy allocated MB", "CDS+EDS+RDS bytes"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("services in the mesh")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(results_dir() / "lazy.png", dpi=110)
    plt.close(fig)


def scale_plot(rows: list[dict]) -> None:
    """Passthrough rows of all four types, one line per protocol and connection layout."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    full = [r for r in rows if r["types"] == "all" and r.get("mode", "passthrough") != "lazy"]
    series: dict[str, list[dict]] = {}
    for r in full:
        layout = "pooled" if r["upstream_connections"] < r["clients"] else "conn each"
        series.setdefault(f"{r['protocol']}, {layout}", []).append(r)
    for name, chosen in sorted(series.items()):
        chosen.sort(key=lambda r: r["clients"])
        ms = [r["clients"] for r in chosen]
        axes[0].plot(ms, [r["proxy_rss_mb"] for r in chosen], marker="o", label=f"RSS {name}")
        axes[0].plot(ms, [r["proxy_peak_rss_mb"] for r in chosen], ":", marker="x",
                     label=f"peak {name}")  # fmt: skip
        axes[1].plot(ms, [r["proxy_push_s"] for r in chosen], marker="o", label=f"via, {name}")
        axes[1].plot(ms, [r["direct_push_s"] for r in chosen], ":", marker=".",
                     label=f"direct, {name}")  # fmt: skip
    axes[0].set_title("xdsproxy memory (MB)")
    axes[1].set_title("full push to all clients (s), medians")
    for ax in axes:
        ax.set_xlabel("clients (M)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(results_dir() / "scale.png", dpi=110)
    plt.close(fig)


def main() -> None:
    lazy = load_json("lazy")
    if lazy and lazy.get("config"):
        lazy_plot(lazy["config"])
    scale = load_json("scale")
    if scale:
        scale_plot(scale)


if __name__ == "__main__":
    main()
