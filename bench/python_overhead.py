"""Where the host time of one eager epx call goes (docs/performance.md).

One rank on cuda:0 (NCCL group of one), 128 tokens x 7168, top-8 of 256: the host time per
call of dispatch (sync_counts=False) and compact combine, issued back to back without waiting
(the GPU keeps up, so this is the host's cost), of a low-latency round (dispatch and zero-copy
combine), the same for the pieces a call is made of (torch.empty on the device, the
current-stream query, epx's input description, an LL output's import), then a cProfile of the
dispatch calls.

    PYTHONPATH=python:build-gpu/python python3 bench/python_overhead.py
"""

import cProfile
import os
import pstats
import time

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29561")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def per_call_us(fn, calls=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def main():
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    import epx
    from epx._tensors import describe, from_c, stream_of

    device = torch.device("cuda", 0)
    tokens, hidden, experts, topk = 128, 7168, 256, 8
    buf = epx.Buffer(None, max_tokens_per_rank=tokens, hidden=hidden, num_experts=experts,
                     num_topk=topk, low_latency_max_tokens=tokens)
    x = torch.randn(tokens, hidden, device=device).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts)[:topk] for _ in range(tokens)]).to(device)
    w = torch.rand(tokens, topk, device=device)
    first = buf.dispatch(x, idx, w, sync_counts=False)
    # The same calls below the Python layer: what the extension and the engine cost, the
    # allocator callbacks into torch included.
    stream = stream_of(device)
    dx, didx, dw = describe(x, "x"), describe(idx, "topk_idx"), describe(w, "weights")
    dy = describe(first.x, "x")
    combine_input = buf.low_latency_combine_input()
    dci = describe(combine_input, "x")

    def ll_round():
        out = buf.low_latency_dispatch(x, idx, w)
        return buf.low_latency_combine(combine_input, out.handle, weights=out.weights)

    first_ll = buf.low_latency_dispatch(x, idx, w)
    # The first round's weights view, described once and passed to every round's combine (both
    # halves): a timing of the calls, not a check of their results.
    dlw = describe(first_ll.weights, "weights")
    buf.low_latency_combine(combine_input, first_ll.handle, weights=first_ll.weights)

    def ll_round_c(imported=(), views=None):
        """The round's C++ calls, with the dispatch's outputs `imported` as from_c would."""
        out = buf._c.low_latency_dispatch(dx, None, didx, dw, None, None, False, stream)
        for name in imported:
            from_c(out[name], views)
        return buf._c.low_latency_combine(dci, dlw, None, out["handle"], False, stream)

    outputs = ("x", "weights", "src_info", "counts")
    # Against an epx without the views' cache (from_c's `views`) the two import rows are left out.
    import_rows = [] if not hasattr(buf, "_workspace_views") else [
        ("  C++ calls + 4 outputs imported afresh", lambda: ll_round_c(outputs)),
        ("  C++ calls + 4 outputs from the views",
         lambda: ll_round_c(outputs, buf._workspace_views))]

    rows = [
        ("dispatch compact, sync_counts=False",
         lambda: buf.dispatch(x, idx, w, sync_counts=False)),
        ("  its C++ call alone (inputs described)",
         lambda: buf._c.dispatch(dx, None, didx, dw, None, False, 1, False, False, stream)),
        ("combine compact", lambda: buf.combine(first.x, first.handle)),
        ("  its C++ call alone (inputs described)",
         lambda: buf._c.combine(dy, None, None, None, None, first.handle._c, False, stream)),
        ("LL round (dispatch + zero-copy combine)", ll_round),
        ("  its C++ calls alone (inputs described)", ll_round_c),
        *import_rows,
        ("torch.empty(1 MB, cuda)", lambda: torch.empty(1 << 20, dtype=torch.uint8,
                                                         device=device)),
        ("torch.cuda.current_stream()", lambda: torch.cuda.current_stream(device)),
        ("epx stream_of(device)", lambda: stream_of(device)),
        ("epx describe(x)", lambda: describe(x, "x")),
    ]
    for name, fn in rows:
        print(f"{name:<40} {per_call_us(fn):8.1f} us host per call")

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(1000):
        buf.dispatch(x, idx, w, sync_counts=False)
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(14)
    del buf
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
