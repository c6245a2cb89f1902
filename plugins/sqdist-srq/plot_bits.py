"""Plot the learned bit width of every quantized layer of a finished run.

    python plugins/sqdist-srq/plot_bits.py RUN_DIR OUT.png

Bars: each layer's integer width (``layer_bits`` in RUN_DIR/summary.json, what export packs);
dashed line: the weight-count weighted average (``avg_weight_bits``). Where the metrics log
has them (SRQ with ``learn_bits``), dots mark each layer's relaxed width ``soft_bits`` at the
last logged step.
"""
import json
import sys
from pathlib import Path


def last_soft_bits(run: Path) -> dict[str, float]:
    soft = {}
    log = run / "metrics.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            for key, value in json.loads(line).items():
                if key.startswith("quant/") and key.endswith(".quantizer/soft_bits"):
                    soft[key[len("quant/"):-len(".quantizer/soft_bits")]] = value
    return soft


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    run, out = Path(argv[0]), Path(argv[1])
    summary_path = run / "summary.json"
    if not summary_path.exists():
        print(f"plot_bits: {summary_path} not found; pass the folder of a finished sqdist.train run", file=sys.stderr)
        return 2
    summary = json.loads(summary_path.read_text())
    bits = summary.get("layer_bits") or {}
    if not bits:
        print(f"plot_bits: {summary_path} has no layer_bits (not a quantized run?)", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bits)
    soft = last_soft_bits(run)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4.8))
    ax.bar(range(len(names)), [bits[n] for n in names], color="tab:blue", label="bits (exported)")
    if soft:
        ax.plot([i for i, n in enumerate(names) if n in soft], [soft[n] for n in names if n in soft], "o",
                color="tab:orange", label="soft_bits (relaxed, last logged step, before the clamp to [min_bits, bits])")
    ax.axhline(summary["avg_weight_bits"], color="black", linestyle="--",
               label=f"average, weighted by weights: {summary['avg_weight_bits']:.2f}")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("bits per weight")
    ax.set_ylim(0, max(bits.values()) + 1)
    top1 = summary.get("final_accuracy")
    ax.set_title(f"learned bit width per layer ({run.name}" + (f", top-1 {top1:.2f}%)" if top1 is not None else ")"))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
