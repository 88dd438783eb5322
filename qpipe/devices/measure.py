"""Measuring memory: the torch allocator and NVML on GPU, the process's resident set on CPU."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from qpipe.devices.envinfo import nvml_process_reader, nvml_process_used_gb


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model owns, counting bitsandbytes' quant state (absmax,
    nested absmax, code) that hangs off its weights rather than being a parameter."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            state = getattr(state, "state2", None)
        add(getattr(tensor, "SCB", None))
    return total


def _libc() -> ctypes.CDLL | None:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    try:
        return ctypes.CDLL(libc_name)
    except OSError:
        return None


def _release_freed_heap(generation: int = 2) -> None:
    """Give freed heap back to the OS so RSS growth measures new memory, not reuse of what an
    earlier stage (the baseline model) freed. glibc keeps freed arenas otherwise.
    ``generation``: how deep the garbage collector looks (2: everything; a process that
    imported transformers and read a GGUF takes most of a second for that)."""
    gc.collect(generation)
    libc = _libc()
    # Not glibc (musl, macOS): there is nothing to trim.
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks from this size up are mapped on their own and unmapped when freed.
HOST_MMAP_THRESHOLD = 1 << 20
_HOST_FREES_SET = False


def return_freed_host_memory() -> bool:
    """Make freed tensors go back to the OS at once, so the resident set follows the live
    memory the estimate prices. glibc's default raises its mmap threshold to each freed
    mapped block (up to 32 MB), after which a forward's transients come from the heap and stay
    resident once freed: SmolLM2's run kept 0.44 GB of heap, 0.06 GB with the threshold fixed
    at 1 MB (bench/results/host_rss_smollm2_cpu.md). Small allocations still come from the
    heap. Once per process; False where it is not glibc."""
    global _HOST_FREES_SET
    if _HOST_FREES_SET:
        return True
    libc = _libc()
    try:
        done = (
            libc is not None
            and libc.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, HOST_MMAP_THRESHOLD) == 1
        )
    except AttributeError:  # not glibc
        done = False
    _HOST_FREES_SET = done
    return done


def _map_large_allocations() -> None:
    """glibc serves large blocks from the heap once a freed one raised its mmap threshold,
    and keeps them when freed: the resident set then shows freed activations as in use. A
    fixed threshold of 64 KiB maps every large block and unmaps it when freed, so RSS follows
    what is really allocated (for the rest of the process: a few page faults more). A
    fine-tuning phase meter's finer threshold than ``return_freed_host_memory``'s."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)


class _MallInfo2(ctypes.Structure):
    _fields_ = [  # glibc's struct mallinfo2, in its order
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not hasattr(libc, "mallinfo2"):
            return None  # not glibc (or older than 2.33)
    except OSError:
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


_PLUG_LARGEST, _PLUG_SMALLEST = 1 << 28, 64 * 1024


def _plug_free_heap() -> list[int]:
    """Fill the free chunks glibc's heap kept from earlier work (a checkpoint loaded and freed
    in this process) with blocks that are never written, so that a measured phase's large
    tensors are mapped and unmapped as they come and go (``_map_large_allocations``): served
    from that free heap instead, they would leave their pages resident when freed, and the
    resident set's peak would count tensors long gone (hundreds of MB after a load). The free
    pages were given back first (``malloc_trim``), so the plugs cost a page of header each.
    Returns the blocks, for ``_unplug``."""
    libc = _glibc()
    if libc is None:
        return []
    plugs: list[int] = []
    size = _PLUG_LARGEST
    while size >= _PLUG_SMALLEST:
        mapped = libc.mallinfo2().hblkhd
        block = libc.malloc(size)
        if not block:
            break
        if libc.mallinfo2().hblkhd > mapped:  # no free chunk this large: it was mapped
            libc.free(block)
            size //= 2
            continue
        plugs.append(block)
    return plugs


def _unplug(plugs: list[int]) -> None:
    libc = _glibc()
    if libc is not None:
        for block in plugs:
            libc.free(block)
    plugs.clear()


def _reset_host_peak() -> bool:
    """Linux lets a process reset its peak RSS (VmHWM) by writing 5 to clear_refs."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _host_peak_bytes() -> int | None:
    try:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 for a moment: Kineto prints a line at each profiler start
    and stop from C++, past Python's logging."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class HostTensorPeak:
    """The most bytes PyTorch's CPU allocator held at once between ``start`` and ``stop``,
    above what it held at ``start``: every tensor a run allocates (activations, the KV cache,
    a library's transients), counted by PyTorch's memory profiler as they are allocated and
    freed. The estimate prices exactly these; the resident set also holds what glibc keeps
    of freed memory, libraries' code paged in, and checkpoint pages a loader read and copied."""

    def __init__(self) -> None:
        self._profile = None
        self.peak: int | None = None

    def start(self) -> HostTensorPeak:
        from torch.profiler import ProfilerActivity, profile

        if not torch.profiler.kineto_available():
            return self
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        try:
            with _quiet_stderr():
                prof.__enter__()
        except RuntimeError:  # another profiler is running (the user's): no count here
            return self
        self._profile = prof
        return self

    def stop(self) -> int | None:
        """The peak in bytes (None when the profiler is not available); idempotent."""
        if self._profile is None:
            return self.peak
        prof, self._profile = self._profile, None
        with _quiet_stderr():
            prof.__exit__(None, None, None)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        current = peak = 0
        for _, nbytes in events:
            current += nbytes
            peak = max(peak, current)
        self.peak = peak
        return peak


class NvmlPeak:
    """The largest NVML reading of this process's GPU memory (what nvidia-smi shows: the CUDA
    context, library modules and everything the allocator reserved) between ``start`` and
    ``stop``, sampled every ``period_s``: the driver keeps no per-process peak."""

    def __init__(self, device_index: int, period_s: float = 0.02) -> None:
        self.index = device_index
        self.period_s = period_s
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = None

    def sample(self) -> float | None:
        used = self._read() if self._read is not None else None
        if used is not None:
            self.peak = used if self.peak is None else max(self.peak, used)
        return used

    def start(self) -> NvmlPeak:
        self._read = nvml_process_reader(self.index)
        if self.sample() is None:
            return self  # no NVML here: nothing to sample
        self._thread = threading.Thread(target=self._run, daemon=True, name="qpipe-nvml")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


@dataclass
class MemoryWindow:
    """Peak memory between ``start()`` and ``stop()``: allocator bytes on GPU; on CPU the
    model's tensors plus the most the run held at once in PyTorch's CPU allocator (once
    ``track_tensors`` is called), else the growth of the resident set. The resident set's
    growth is kept beside it (``rss_gb``), as the OS shows it.

    A window that outlives the code that opened it (the load stage's, read by validate_vram)
    is read with ``read()`` and closed by its opener with ``close()``; ``stop()`` is both."""

    device: str
    baseline: int = 0
    peak: int = 0
    reserved_peak: int = 0
    nvml_gb: float | None = None  # NVML's peak for the process over the window (GPU)
    nvml_now_gb: float | None = None  # NVML's reading at the last read()
    reserved_now: int = 0  # the allocator's reserve at the last read()
    # GPU: the loading phase's peak and what stays allocated after it (split_phases)
    load_peak: int | None = None
    loaded: int | None = None
    # CPU: the model's tensors when the running phase began, and the run's own tensor peak
    tensors_base: int | None = None
    tensors_peak: int | None = None
    _sampler: threading.Thread | None = None
    _running: bool = False
    _nvml: NvmlPeak | None = None
    _tensors: HostTensorPeak | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def start(self) -> MemoryWindow:
        if self.on_gpu:
            # What earlier stages still hold (a quantizer's model waiting for the garbage
            # collector) is not the loaded model's: free it, and count from what is left.
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self._nvml = NvmlPeak(torch.device(self.device).index or 0).start()
            return self
        return_freed_host_memory()
        _release_freed_heap()
        self.baseline = psutil.Process().memory_info().rss
        if not _reset_host_peak():
            self._start_sampler()
        return self

    def _start_sampler(self) -> None:
        # Fallback where clear_refs is not allowed: sample RSS every 10 ms.
        self._running = True
        proc = psutil.Process()

        def sample() -> None:
            while self._running:
                self.peak = max(self.peak, proc.memory_info().rss)
                time.sleep(0.01)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def stop(self) -> MemoryWindow:
        self.read()
        self.close()
        return self

    def close(self) -> None:
        """End the sampling threads, where there are (idempotent)."""
        if self._sampler is not None and self._running:
            self._running = False
            self._sampler.join()
        if self._nvml is not None:
            self._nvml.stop()
        if self._tensors is not None:  # a run that failed before read(): stop profiling
            self._tensors.stop()

    def read(self) -> MemoryWindow:
        """Take the peak so far; the window stays open."""
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            self.peak = max(torch.cuda.max_memory_allocated(self.device), self.load_peak or 0)
            self.reserved_peak = max(
                torch.cuda.max_memory_reserved(self.device), self.reserved_peak
            )
            self.reserved_now = torch.cuda.memory_reserved(self.device)
            if self._nvml is not None:
                self.nvml_now_gb = self._nvml.sample()
                self.nvml_gb = self._nvml.peak
            else:
                self.nvml_now_gb = nvml_process_used_gb(torch.device(self.device).index or 0)
                self.nvml_gb = self.nvml_now_gb
            return self
        if self._tensors is not None:
            self.tensors_peak = self._tensors.stop()
        if self._sampler is None:
            self.peak = _host_peak_bytes() or psutil.Process().memory_info().rss
        return self

    def track_tensors(self, model: torch.nn.Module) -> None:
        """CPU, after ``split_host_peak``: measure the running phase as the model's tensors
        plus the most PyTorch's allocator holds at once until ``read()``."""
        if self.on_gpu:
            return
        self.tensors_base = tensor_bytes(model)
        self._tensors = HostTensorPeak().start()

    def split_host_peak(self) -> float | None:
        """CPU only: end the loading phase and start a fresh peak for the running phase.

        Returns the loading phase's peak (GB above the baseline). Loaders hold transient
        copies (a checkpoint's tensors next to the repacked ones) that the allocator keeps as
        free heap; the estimate prices a model that runs, so the running phase is measured
        from the model's own resident memory after that heap is given back. On GPU the
        allocator's peak already is the right quantity and stays the window's; the two
        phases are only kept apart for the report (``phases_gb``).
        """
        if self.on_gpu:
            self._split_gpu()
            return None
        if self._sampler is not None:
            return None
        loading_peak = (_host_peak_bytes() or 0) - self.baseline
        _release_freed_heap()
        _reset_host_peak()
        return max(loading_peak, 0) / 1e9

    def _split_gpu(self) -> None:
        """The window's peak stays the larger of the two phases; each is kept apart too, so a
        run says whether loading (transient copies) or running (activations, cache) set it."""
        torch.cuda.synchronize(self.device)
        self.load_peak = torch.cuda.max_memory_allocated(self.device)
        self.reserved_peak = torch.cuda.max_memory_reserved(self.device)
        self.loaded = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def phases_gb(self) -> dict[str, float]:
        """GPU, after ``split_host_peak``: GB above the baseline at the loading peak, after
        loading, and at the running peak."""
        if self.load_peak is None or self.loaded is None:
            return {}
        run_peak = torch.cuda.max_memory_allocated(self.device)
        return {
            "mem.load_peak_gb": (self.load_peak - self.baseline) / 1e9,
            "mem.loaded_gb": (self.loaded - self.baseline) / 1e9,
            "mem.run_peak_gb": (run_peak - self.baseline) / 1e9,
        }

    @property
    def measures_tensors(self) -> bool:
        """CPU: whether ``used_gb`` is the tensors' peak (else the resident set's growth)."""
        return self.tensors_base is not None and self.tensors_peak is not None

    @property
    def used_gb(self) -> float:
        if self.measures_tensors:
            return (self.tensors_base + self.tensors_peak) / 1e9
        return self.growth_gb

    @property
    def growth_gb(self) -> float:
        """Allocator bytes above the baseline on GPU; the resident set's growth on CPU."""
        return max(self.peak - self.baseline, 0) / 1e9


@dataclass
class PhaseMeter:
    """The peak of one phase at a time (a training step's forward, backward, optimizer step):
    on GPU the torch allocator's peak (absolute) and NVML's view of the process at the
    phase's end; on CPU the resident set's peak above ``baseline`` (the RSS when the meter
    was made: the loaded model and the libraries). ``peaks`` keeps each phase's largest."""

    device: str
    baseline: int = 0
    peaks: dict[str, float] = field(default_factory=dict)
    nvml: dict[str, float] = field(default_factory=dict)

    _plugs: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.on_gpu:
            _map_large_allocations()
            _release_freed_heap()
            self._plugs = _plug_free_heap()
            self.baseline = psutil.Process().memory_info().rss

    def close(self) -> None:
        """Give the plugged free heap back to glibc (the meter's phases are over)."""
        _unplug(self._plugs)

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def rebase(self) -> float:
        """CPU: take the baseline again (after what is not to be measured: the model made
        trainable, a warm-up); the resident set's growth since the meter was made, in GB."""
        if self.on_gpu:
            return 0.0
        _release_freed_heap()
        rss = psutil.Process().memory_info().rss
        grown, self.baseline = (rss - self.baseline) / 1e9, rss
        return grown

    @contextlib.contextmanager
    def phase(self, name: str, record: bool = True):
        """Measure what runs inside as phase ``name`` (``record=False``: run it unmeasured)."""
        if record:
            self._start()
        yield
        if record:
            self._stop(name)

    def _start(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # freed heap that glibc kept from the last phase would count as this one's; what
            # a step left for the garbage collector is young (the full pass was at the baseline)
            _release_freed_heap(generation=1)
            _reset_host_peak()

    def _stop(self, name: str) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 1e9
            used = nvml_process_used_gb(torch.device(self.device).index or 0)
            if used is not None:
                self.nvml[name] = max(self.nvml.get(name, 0.0), used)
        else:
            high = _host_peak_bytes() or psutil.Process().memory_info().rss
            peak = max(high - self.baseline, 0) / 1e9
        self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
