"""PNG plots of a pilot report: accuracy against FLOPs, and accuracy against remote calls."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_pilot"]


def plot_pilot(report: dict, out: Path) -> list[str]:
    """Write pilot_accuracy_flops.png and pilot_remote_calls.png under `out`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import NullFormatter

    dense, moe = report["dense_points"], report["moe_points"]
    target_ratio = report["target_flops_ratio"]
    paths = []

    figure, axes = plt.subplots(figsize=(8, 5.5))
    axes.scatter([p["flops"] for p in moe], [100 * p["test_accuracy"] for p in moe], s=10, alpha=0.3,
                 color="tab:orange", label="mixture settings")
    axes.scatter([p["flops"] for p in dense], [100 * p["test_accuracy"] for p in dense], s=30,
                 color="tab:blue", label="dense MLPs")
    for points, color, name in ((report["dense_front"], "tab:blue", "dense Pareto front"),
                                (report["moe_front"], "tab:orange", "mixture Pareto front")):
        axes.plot([p["flops"] for p in points], [100 * p["test_accuracy"] for p in points], "-o", color=color,
                  markersize=4, label=name)
    threshold = 100 * (report["dense_best_accuracy"] - report["match_tolerance"])
    axes.axhline(threshold, color="gray", linestyle="--", linewidth=1,
                 label=f"best dense (chosen on validation) - {100 * report['match_tolerance']:g} point")
    axes.axvline(report["dense_match_flops"] * target_ratio, color="tab:green", linestyle=":", linewidth=1,
                 label=f"{target_ratio:g} x FLOPs of matching dense")
    if report["moe_setting"] is not None:
        axes.scatter([report["moe_flops"]], [100 * report["moe_accuracy"]], marker="*", s=200,
                     color="tab:red", zorder=5, label="chosen mixture setting")
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a log axis overlap
    axes.set_xlabel("FLOPs per example (multiply-adds, log scale)")
    axes.set_ylabel(f"test accuracy, % (mean of {report['seeds']} seeds)")
    axes.set_title(f"Accuracy against compute on {report['dataset']}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = out / "pilot_accuracy_flops.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    paths.append(str(path))

    figure, axes = plt.subplots(figsize=(8, 5))
    scatter = axes.scatter([p["remote_calls_per_request"] for p in moe], [100 * p["test_accuracy"] for p in moe],
                           c=[p["flops"] for p in moe], cmap="viridis", s=14)
    figure.colorbar(scatter, label="FLOPs per example")
    axes.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    axes.set_xlabel("remote calls per one-row request (experts + dense fallback)")
    axes.set_ylabel("test accuracy, %")
    axes.set_title("Mixture settings: accuracy against remote calls")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path = out / "pilot_remote_calls.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    paths.append(str(path))
    return paths
