"""PyTorch on the bench's GPT-2 shapes, as the peer column of gradclip's bench.

Times torch.nn.utils.get_total_norm, clip_grad_norm_ (foreach) and clip_grad_value_ on
gradients of the shapes in bench/gpt2-small-shapes.txt, in f32 and bf16, on CUDA when it
is there (else the CPU), and one fused AdamW step after the clip. Medians of N runs,
gradients reset before each (untimed). Writes JSON records like the bench's
({workload, dtype, path, op, ms, floor_ms, plain_ms, adapter}). Without torch it says so
and exits 0: the peer column is optional.

With --serve it is the bench's same-run peer instead (GRADCLIP_TORCH_PYTHON): it reads one
JSON request per line on stdin, {"workload", "lens", "dtype", "op", "runs", "sigma"}, times
that operation on gradients of those lengths (normal, std sigma; thresholds as the bench's:
half and ten times their norm, and +-sigma), the better of foreach and the per-tensor loop,
and answers one JSON line {"ms", "variant", "adapter", "op", "dtype", "workload"} (or
{"error"}); {"probe": true} answers {"adapter", "cuda"}. The optimizer rows ("clip + AdamW
step, unfused" / "fused") time clip_grad_norm_ then AdamW (foreach or loop / fused=True).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def load_shapes(path):
    shapes = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        _, dims = line.split("\t")
        shapes.append([int(d) for d in dims.split("x")])
    return shapes


# The loss scale the bench's mixed-precision rows carry (`LOSS_SCALE` of examples/bench.rs).
LOSS_SCALE = 1024.0


def serve(torch):
    """The bench's peer: one request per line on stdin, one answer per line on stdout."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    adapter = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    cache = {}

    def timed(fn, reset, runs):
        times = []
        for _ in range(runs + 1):
            reset()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times[1:])

    for line in sys.stdin:
        try:
            req = json.loads(line)
            if req.get("probe"):
                print(json.dumps({"adapter": adapter, "cuda": cuda}), flush=True)
                continue
            dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[req["dtype"]]
            key = (req["workload"], req["dtype"])
            if key not in cache:
                cache.clear()  # one workload in memory at a time
                gen = torch.Generator(device=device).manual_seed(7)
                params = [torch.zeros(n, dtype=dtype, device=device, requires_grad=True) for n in req["lens"]]
                pristine = [torch.randn(n, generator=gen, dtype=dtype, device=device) * req["sigma"]
                            for n in req["lens"]]
                total = float(torch.nn.utils.get_total_norm(pristine))
                cache[key] = (params, pristine, total)
            params, pristine, total = cache[key]

            def reset():
                for p, g in zip(params, pristine):
                    p.grad = g.clone()

            sigma, n = req["sigma"], len(params)
            ops = {
                "total norm (L2)": lambda f: torch.nn.utils.get_total_norm([p.grad for p in params], foreach=f),
                "global clip, clipping": lambda f: torch.nn.utils.clip_grad_norm_(params, total * 0.5, foreach=f),
                "global clip, not clipping": lambda f: torch.nn.utils.clip_grad_norm_(params, total * 10, foreach=f),
                "value clip": lambda f: torch.nn.utils.clip_grad_value_(params, sigma, foreach=f),
            }
            # clip_grad_norm_ then an AdamW step (lr 1e-3, f32 parameters): the gradclip
            # bench's unfused row against AdamW's foreach and loop implementations, its
            # fused row against AdamW(fused=True).
            def step(impl):
                opt = torch.optim.AdamW(params, lr=1e-3, **impl)
                return lambda f: (torch.nn.utils.clip_grad_norm_(params, total * 0.5, foreach=True),
                                  opt.step())
            # Mixed precision (the gradients carry the loss scale 1024): GradScaler's
            # unscale_, clip_grad_norm_, then scaler.step and scaler.update, PyTorch's recipe;
            # it has no way to fuse the unscaling into the clip or the step.
            def scaled_step(impl):
                opt = torch.optim.AdamW(params, lr=1e-3, **impl)
                scaler = torch.amp.GradScaler(device.type, init_scale=LOSS_SCALE,
                                              growth_interval=2**30)

                def run(_f):
                    scaler.scale(torch.ones((), device=device))  # starts the iteration
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, total * 0.5 / LOSS_SCALE, foreach=True)
                    scaler.step(opt)
                    scaler.update()
                return run
            variants = [(True, "foreach"), (False, "loop")]
            if req["op"] == "loss-scaled clip + AdamW step, separate passes":
                op, variants = None, [(scaled_step({"foreach": True}), "GradScaler + AdamW(foreach)")]
            elif req["op"] == "loss-scaled clip + AdamW step, fused":
                op, variants = None, [(scaled_step({"fused": True}), "GradScaler + AdamW(fused)")]
            elif req["op"] == "clip + AdamW step, unfused":
                op, variants = None, [(step({"foreach": True}), "AdamW(foreach)"),
                                      (step({"foreach": False}), "AdamW(loop)")]
            elif req["op"] == "clip + AdamW step, fused":
                op, variants = None, [(step({"fused": True}), "AdamW(fused)")]
            else:
                op = ops[req["op"]]
            timings, failures = [], []
            for f, name in variants:
                run = (lambda: op(f)) if op else (lambda: f(True))
                try:
                    timings.append((timed(run, reset, req["runs"]), name))
                except Exception as e:  # one variant failing leaves the other
                    failures.append(f"{type(e).__name__}: {e}")
            if not timings:
                raise RuntimeError("; ".join(failures))
            best = min(timings)
            answer = {"ms": best[0], "variant": best[1], "adapter": adapter, "tensors": n,
                      "op": req["op"], "dtype": req["dtype"], "workload": req["workload"]}
        except Exception as e:  # the bench reports it and goes on without the peer figure
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=str(Path(__file__).with_name("gpt2-small-shapes.txt")))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json")
    ap.add_argument("--serve", action="store_true", help="answer the bench's requests on stdin")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_peer: no torch in this Python; no peer column", file=sys.stderr)
        return 0
    if args.serve:
        return serve(torch)
    if not args.json:
        ap.error("--json is required without --serve")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    adapter = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    path = "torch-cuda" if cuda else "torch-cpu"
    shapes = load_shapes(args.shapes)
    n = sum(torch.Size(s).numel() for s in shapes)

    def timed(fn, reset):
        times = []
        for _ in range(args.runs + 1):
            reset()
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times[1:])

    records = []
    for dtype, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        gen = torch.Generator(device=device).manual_seed(7)
        params = [torch.zeros(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]
        pristine = [torch.randn(s, generator=gen, dtype=dtype, device=device) * 1e-3 for s in shapes]

        def reset():
            for p, g in zip(params, pristine):
                p.grad = g.clone()

        reset()
        total = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        ops = {
            "total norm (L2)": lambda: torch.nn.utils.get_total_norm([p.grad for p in params]),
            "global clip, clipping": lambda: torch.nn.utils.clip_grad_norm_(params, total * 0.5, foreach=True),
            "global clip, not clipping": lambda: torch.nn.utils.clip_grad_norm_(params, total * 10, foreach=True),
            "value clip": lambda: torch.nn.utils.clip_grad_value_(params, total / n**0.5, foreach=True),
        }
        # A floor measured the same way: one copy of the gradients.
        flat = torch.cat([g.flatten() for g in pristine])
        copy = torch.empty_like(flat)
        floor = timed(lambda: copy.copy_(flat), lambda: None)
        for op, fn in ops.items():
            ms = timed(fn, reset)
            records.append(dict(workload="GPT-2 small", dtype=name, path=path, op=op, ms=ms,
                                floor_ms=floor, plain_ms=None, adapter=adapter))
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True) if dtype == torch.float32 else None
        if opt is not None:
            def clip_and_step():
                torch.nn.utils.clip_grad_norm_(params, total * 0.5, foreach=True)
                opt.step()
            ms = timed(clip_and_step, reset)
            records.append(dict(workload="GPT-2 small", dtype=name, path=path,
                                op="clip + AdamW(fused) step", ms=ms, floor_ms=floor,
                                plain_ms=None, adapter=adapter))
        for r in records[-5:]:
            print(f"  {r['path']:<10} {r['dtype']:<5} {r['op']:<28} {r['ms']:9.3f} ms  (copy floor {floor:.3f} ms)")
    Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    print(f"torch_peer: wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
