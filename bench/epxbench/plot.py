"""The PNG beside a record: GB/s against tokens per rank, one panel per routing, for epx
dispatch and combine, the NCCL baselines and the copy-engine link limit. Needs matplotlib."""

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .report import ROUTING_ORDER  # noqa: E402


def plot(path):
    """Draws the record at `path` into the PNG of the same name; returns the PNG's path."""
    with open(path) as f:
        document = json.load(f)
    cases = document["cases"]
    routings = [r for r in ROUTING_ORDER if any(c["routing"] == r for c in cases)]
    if not routings:
        raise ValueError(f"{path}: no cases to plot")
    lines = [("dispatch_compact", "epx dispatch compact", "o-", "C0"),
             ("dispatch_expanded", "epx dispatch expanded", "o--", "C0"),
             ("dispatch_compact_fp8", "epx dispatch compact fp8", "o:", "C2"),
             ("combine_compact", "epx combine compact", "s-", "C1"),
             ("combine_expanded", "epx combine expanded", "s--", "C1"),
             ("nccl_a2a_fwd", "NCCL all_to_all_single (dispatch rows)", "^-", "k"),
             ("nccl_a2a_back", "NCCL all_to_all_single (combine rows)", "v-", "0.3"),
             ("nccl_dispatch_expanded_pipeline", "NCCL a2a + permutation (dispatch)", "^--",
              "0.5")]
    fig, axes = plt.subplots(1, len(routings), figsize=(6.5 * len(routings), 4.6),
                             squeeze=False)
    for ax, routing in zip(axes[0], routings):
        for op, label, style, color in lines:
            points = sorted((c["tokens_per_rank"], c["gbps"]) for c in cases
                            if c["op"] == op and c["routing"] == routing and c.get("gbps"))
            if points:
                ax.plot(*zip(*points), style, color=color, label=label)
        if document.get("link_gbps"):
            ax.axhline(document["link_gbps"], color="r", ls=":",
                       label=f"copy-engine link limit ({document['link_gbps']:.0f} GB/s)")
        ax.set_xscale("log", base=2)
        ticks = sorted({c["tokens_per_rank"] for c in cases if c["routing"] == routing})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("GB/s into the busiest rank")
        ax.set_title(f"{routing} routing")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    args = document.get("args", {})
    fig.suptitle(f"epx on {document.get('num_ranks')} x {document.get('gpu')}, hidden "
                 f"{args.get('hidden')}, top-{args.get('topk')} of {args.get('experts')}, "
                 f"commit {str(document.get('commit'))[:10]}", fontsize=10)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
