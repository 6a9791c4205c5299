"""Where a training step's time goes: ``torch.profiler`` over a window of Lightning training steps, summarised.

``ProfileWindow`` is a Lightning callback that profiles the steps ``first .. last - 1`` of a fit (CPU ops, and CUDA
kernels where there is a GPU) and clocks the host time between steps (Lightning's loop fetching the next batch, the
transfer hooks: what a loader-bound run waits on). ``summarise`` turns the trace into:

* the top kernels (CUDA) or ops (CPU) by self time;
* the share of that time by kind: convolution, normalisation (batch and layer norm), attention (scaled dot product,
  flash, memory-efficient), matmul, optimiser, loss, copies and casts, the rest
  (elementwise, reductions, compiled Triton kernels that fuse several kinds are their own kind);
* on a GPU, the busy share: kernel time over the window's wall time (well below 1: the step waits on the host,
  launches, or synchronisation).

Kinds come from the op that launched the time and the scopes around it: the innermost op whose name says its kind
decides (``_foreach_*`` and fused optimiser kernels, convolution, batch norm, ``nll_loss`` / ``log_softmax``, mm,
copies); what is left counts as optimiser when it ran in ``Optimizer.step#...`` outside the training step and
outside autograd's backward (Lightning runs both inside the optimiser's step, as its closure).
"""

from __future__ import annotations

import re
import time
from typing import Any

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

# (kind, pattern on an op or kernel name), the first match wins
OP_KINDS = (
    ("optimiser", re.compile(r"_foreach_|_fused_(sgd|adam)|multi_tensor_apply", re.I)),
    ("compiled (Triton, fused)", re.compile(r"^triton_|CompiledFunction|Torch-Compiled", re.I)),
    ("normalisation", re.compile(r"batch_norm|batchnorm|bn_fw|bn_bw|welford|layer_norm|layernorm", re.I)),
    ("attention", re.compile(r"scaled_dot_product|flash|efficient_attention|fmha|_attention", re.I)),
    ("convolution", re.compile(r"conv|cudnn|implicit_gemm|wgrad|dgrad|xmma", re.I)),
    ("loss", re.compile(r"nll_loss|log_softmax|cross_entropy|logsoftmax|nllloss", re.I)),
    ("matmul", re.compile(r"\bmm\b|addmm|bmm|matmul|gemm|linear|cutlass|sm\d\d_", re.I)),
    ("copies and casts", re.compile(r"copy|_to_copy|contiguous|clone|memcpy|memset|\bto\b", re.I)),
)
# Lightning runs forward and backward inside the optimiser's step (its closure): only what runs in Optimizer.step
# outside the training step (scoped by ProfileWindow) and outside autograd's engine is the optimiser's own work.
TRAINING_STEP_SCOPE = "clbd: training_step (forward, loss)"
OTHER = "elementwise and other"


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ProfileWindow(L.Callback):
    """Profile the training steps with batch index ``first .. last - 1`` (an epoch of ready batches)."""

    def __init__(self, first: int, last: int, device: torch.device):
        self.first, self.last, self.device = first, last, device
        self.profiler: profile | None = None
        self.between_steps_s = 0.0
        self.window_s = 0.0
        self._start = self._last_end = None

    def setup(self, trainer, pl_module, stage) -> None:
        """The training step in a profiler scope of its own: Lightning runs it inside ``Optimizer.step``."""
        step = pl_module.training_step

        def scoped(*args, **kwargs):
            with torch.profiler.record_function(TRAINING_STEP_SCOPE):
                return step(*args, **kwargs)

        pl_module.training_step = scoped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities)
            self._start = _now(self.device)
            self.profiler.__enter__()
        elif self._last_end is not None and self.first < batch_idx <= self.last:
            self.between_steps_s += time.perf_counter() - self._last_end
        if batch_idx == self.last and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.window_s = _now(self.device) - self._start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first <= batch_idx < self.last:
            self._last_end = time.perf_counter()


def _kind(event: Any) -> str:
    names, node = [], event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    for name in names:  # innermost first
        for kind, pattern in OP_KINDS:
            if pattern.search(name):
                return kind
    in_step = any(name == TRAINING_STEP_SCOPE or name.startswith("autograd::engine") for name in names)
    if not in_step and any(name.startswith("Optimizer.step") for name in names):
        return "optimiser"
    return OTHER


def summarise(window: ProfileWindow, steps: int, top: int = 12) -> dict[str, Any]:
    """Top kernels/ops and the shares by kind, per step, from a finished ``ProfileWindow``."""
    if window.profiler is None or not window.window_s:
        raise RuntimeError("ProfileWindow: the profiled window did not run to its end")
    on_gpu = window.device.type == "cuda"
    events = window.profiler.events()
    by_kind: dict[str, float] = {}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels are counted through the CPU op that launched them (self_device_time_total)
        spent = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if spent > 0:
            kind = _kind(event)
            by_kind[kind] = by_kind.get(kind, 0.0) + spent
    total = sum(by_kind.values()) or 1.0
    averages = window.profiler.key_averages()
    if on_gpu:
        rows = [a for a in averages if a.self_device_time_total > 0 and a.device_type == torch.autograd.DeviceType.CUDA]
        rows = rows or [a for a in averages if a.self_device_time_total > 0]
        time_of = lambda a: a.self_device_time_total  # noqa: E731
    else:
        rows = [a for a in averages if a.self_cpu_time_total > 0]
        time_of = lambda a: a.self_cpu_time_total  # noqa: E731
    rows.sort(key=time_of, reverse=True)
    clock = "GPU kernel" if on_gpu else "CPU op (self)"
    return {
        "steps": steps,
        "clock": clock,
        "window_ms_per_step": 1e3 * window.window_s / steps,
        "between_steps_ms_per_step": 1e3 * window.between_steps_s / steps,
        "profiled_ms_per_step": total / 1e3 / steps,
        "busy_share": (total / 1e6) / window.window_s if on_gpu else None,
        "shares": {kind: spent / total for kind, spent in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [
            {
                "name": a.key[:120],
                "ms_per_step": time_of(a) / 1e3 / steps,
                "share": time_of(a) / total,
                "calls": a.count,
            }
            for a in rows[:top]
        ],
    }


def markdown(case: str, summary: dict[str, Any]) -> str:
    """The summary as markdown, for docs/benchmarks.md's "where the time goes"."""
    lines = [
        f"### {case}",
        "",
        f"{summary['steps']} steps profiled: {summary['window_ms_per_step']:.2f} ms per step of wall time, "
        f"{summary['profiled_ms_per_step']:.2f} ms of {summary['clock']} time"
        + (f" (busy {summary['busy_share']:.0%})" if summary.get("busy_share") is not None else "")
        + f", {summary['between_steps_ms_per_step']:.2f} ms on the host between steps (loop, next batch).",
        "",
        "| kind | share |",
        "| --- | --- |",
        *[f"| {kind} | {share:.1%} |" for kind, share in summary["shares"].items()],
        "",
        f"| top {summary['clock']} | ms per step | share | calls |",
        "| --- | --- | --- | --- |",
        *[
            f"| `{row['name'].replace('|', '/')}` | {row['ms_per_step']:.3f} | {row['share']:.1%} | {row['calls']} |"
            for row in summary["top"]
        ],
        "",
    ]
    return "\n".join(lines)
