"""The record of a run and its table: the JSON and the stdout table.

Reads records of every version of the schema (the fields a case has not are shown as "-").
No PyTorch needed.
"""

import json
import os

from . import say

# Display order: routings, then the epx ops in pipeline order, then the NCCL baselines.
ROUTING_ORDER = ("uniform", "skewed")
OP_ORDER = ("dispatch_compact", "dispatch_compact_nosync", "dispatch_expanded",
            "dispatch_expanded_nosync", "dispatch_cached", "dispatch_compact_fp8",
            "dispatch_expanded_fp8", "combine_compact", "combine_expanded", "combine_backward",
            "nccl_a2a_fwd", "nccl_a2a_back", "nccl_a2a_fwd_fp8", "nccl_dispatch_compact_pipeline",
            "nccl_dispatch_expanded_pipeline", "nccl_combine_compact_pipeline",
            "nccl_combine_expanded_pipeline", "nccl_combine_backward_pipeline")


def write_json(path, meta, link, cases, notes, args, done=False):
    """The record, replaced in place (through a temporary file: never half written)."""
    document = {**meta, "link_gbps": round(link, 1) if link else None, "complete": done,
                "args": dict(vars(args)), "notes": list(notes), "cases": cases}
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(temporary, path)


def sorted_cases(document):
    """Cases by routing, tokens, then op (OP_ORDER; unknown ops last, by name)."""
    def key(case):
        op = case["op"]
        return (ROUTING_ORDER.index(case["routing"]) if case["routing"] in ROUTING_ORDER
                else len(ROUTING_ORDER), case["tokens_per_rank"],
                OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER), op)
    return sorted(document["cases"], key=key)


def failed_checks(document):
    return [c for c in document["cases"] if str(c.get("check") or "").startswith("mismatch")]


# ---- the stdout table --------------------------------------------------------------------------

def fmt(value, spec):
    """`value` formatted with `spec` ("9.1f"), or "-" in the same width."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 1))
    return format(value, spec)


HEADER = (f"{'op':<32} {'routing':<8} {'tokens':>6} {'time_us':>9} {'GB/s':>7} "
          f"{'nccl_us':>9} {'nccl_GB/s':>9} {'pipe_us':>9} {'vs_nccl':>7} {'vs_pipe':>7} "
          f"{'vs_link':>7} {'graph_us':>8} {'nccl_gr':>7} {'sms':>4} check")


def table_row(c):
    return (f"{c['op']:<32} {c['routing']:<8} {c['tokens_per_rank']:>6} "
            f"{fmt(c.get('time_us'), '9.1f')} {fmt(c.get('gbps'), '7.1f')} "
            f"{fmt(c.get('nccl_time_us'), '9.1f')} {fmt(c.get('nccl_gbps'), '9.1f')} "
            f"{fmt(c.get('nccl_pipeline_time_us'), '9.1f')} {fmt(c.get('vs_nccl'), '7.2f')} "
            f"{fmt(c.get('vs_nccl_pipeline'), '7.2f')} {fmt(c.get('vs_link'), '7.2f')} "
            f"{fmt(c.get('graph_time_us'), '8.1f')} {fmt(c.get('nccl_graph_time_us'), '7.1f')} "
            f"{fmt(c.get('num_sms'), '4d')} {c.get('check') or '-'}")


def print_table(document):
    say(f"\n== epx benchmark: {document.get('num_ranks')} x {document.get('gpu')}, commit "
        f"{str(document.get('commit'))[:12]}, nccl {document.get('nccl', '-')}, link "
        f"{fmt(document.get('link_gbps'), '.1f')} GB/s (copy engine)")
    say(HEADER)
    for case in sorted_cases(document):
        say(table_row(case))
    for note in document.get("notes", []):
        say(f"note: {note}")
