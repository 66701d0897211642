"""A profiled training step: its top kernels, and the GPU's idle time with what the host did before it waited.

A step whose kernels add up to much less than its wall time waits on the host somewhere: the gaps
between one kernel's end and the next one's start, with the kernels on either side and the host's
synchronizations (`.item()`, stream syncs) that ended just before, say where. Used by bench/profile_step.py
and bench/recipes.py --profile-step.
"""

import torch

SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def idle_report(prof, min_ms: float = 0.5, top: int = 12) -> str:
    """Markdown: the GPU's idle time between the profiled region's first and last kernel, its largest gaps
    (at least `min_ms`) with the kernels around them and the host syncs that ended within 1 ms before
    each, and the host syncs' count."""
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    syncs = [e for e in events if e.name in SYNC_OPS]
    if not kernels:
        return "no GPU kernels in the profiled region\n"
    first = kernels[0].time_range.start
    busy_until, before, idle, gaps = first, kernels[0], 0.0, []
    for kernel in kernels:
        gap_ms = (kernel.time_range.start - busy_until) / 1e3
        if gap_ms > 0:
            idle += gap_ms
            if gap_ms >= min_ms:
                waited_on = [s.name for s in syncs if busy_until - 1e3 <= s.time_range.end <= kernel.time_range.start]
                gaps.append(((busy_until - first) / 1e3, gap_ms, before.name, kernel.name, ", ".join(waited_on)))
        if kernel.time_range.end > busy_until:
            busy_until, before = kernel.time_range.end, kernel
    span_ms = (busy_until - first) / 1e3
    lines = [f"GPU idle {idle:.1f} ms of the {span_ms:.1f} ms from the first kernel to the last "
             f"({len(kernels)} kernels); host syncs: {len(syncs)}; gaps of >= {min_ms} ms: {len(gaps)} "
             f"({sum(g[1] for g in gaps):.1f} ms), the largest:", "",
             "| ms into the step | gap ms | kernel before | kernel after | host syncs ended within 1 ms before |",
             "|---|---|---|---|---|"]
    for at, gap_ms, previous, following, waited_on in sorted(gaps, key=lambda g: -g[1])[:top]:
        lines.append(f"| {at:.1f} | {gap_ms:.2f} | {_short(previous)} | {_short(following)} | {waited_on or '-'} |")
    return "\n".join(lines) + "\n"


LAYER_BACKWARD = "OffloadedCheckpointFunctionBackward"  # autograd's name for a checkpointed layer's backward


def layer_backward_report(prof) -> str:
    """One line: the checkpointed layers' backward calls, the host's time a call (the node's span, its
    recompute and backward ops included) against the GPU time of the kernels it launched. Where the host's
    is the longer, the GPU waits for the host between layers."""
    calls = [e for e in prof.events() if e.name == LAYER_BACKWARD]
    if not calls:
        return ""
    host_ms = sum(e.time_range.elapsed_us() for e in calls) / len(calls) / 1e3
    gpu_ms = sum(e.device_time_total for e in calls) / len(calls) / 1e3
    return (f"Checkpointed layers' backward: {len(calls)} calls, host {host_ms:.2f} ms a call, GPU {gpu_ms:.2f} "
            f"ms a call (kernels it launched)\n")


def step_report(prof, rows: int = 30) -> str:
    """Markdown: the profiled step's kernels by device time (a fenced table), then `idle_report` and
    `layer_backward_report`."""
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    return f"```\n{table}\n```\n\n{idle_report(prof)}\n{layer_backward_report(prof)}"
