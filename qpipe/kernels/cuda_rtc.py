"""CUDA C++ kernels compiled at run time (NVRTC) and launched through the driver API, with
ctypes only: no nvcc, no build step, no extension module.

NVRTC comes with every CUDA build of PyTorch (the ``nvidia-cuda-nvrtc`` wheel, or the toolkit);
``QPIPE_NVRTC`` names the library file where it is elsewhere. Compiled cubins are cached on
disk (``$QPIPE_KERNEL_CACHE``, default ``~/.cache/qpipe/cubin``), keyed by the source, the
instantiation, the architecture and NVRTC's version; a cache file is written whole (a temporary
file renamed), so processes sharing the cache never read half of one.

A launch is one ``cuLaunchKernel`` call on the caller's current torch stream, so CUDA-graph
capture records it like any other kernel. ``BoundLaunch`` prepares the argument array once and
changes only the pointers that differ per call (a few microseconds of host time).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import site
import sys
import threading
from pathlib import Path

import torch


class RtcUnavailable(RuntimeError):
    """NVRTC or the CUDA driver cannot be used here (the caller falls back)."""


_LOCK = threading.Lock()
_NVRTC: ctypes.CDLL | None = None
_CUDA: ctypes.CDLL | None = None


def _candidates() -> list[str]:
    """NVRTC library files to try, most specific first."""
    out = []
    if os.environ.get("QPIPE_NVRTC"):
        out.append(os.environ["QPIPE_NVRTC"])
    major = str(torch.version.cuda or "").split(".")[0]
    for name in ([f"libnvrtc.so.{major}"] if major else []) + ["libnvrtc.so.13", "libnvrtc.so.12"]:
        out.append(name)
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for root in roots:
        out += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*")))
    out += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    return [p for p in dict.fromkeys(out) if "builtins" not in p and ".alt." not in p]


def nvrtc() -> ctypes.CDLL:
    """The NVRTC library (RtcUnavailable if none loads)."""
    global _NVRTC
    with _LOCK:
        if _NVRTC is None:
            tried = []
            for path in _candidates():
                try:
                    lib = ctypes.CDLL(path)
                    lib.nvrtcVersion  # noqa: B018 (a library that is NVRTC)
                    _preload_builtins(lib)
                except (OSError, AttributeError) as err:
                    tried.append(f"{path}: {err}"[:120])
                    continue
                _NVRTC = lib
                break
            if _NVRTC is None:
                raise RtcUnavailable("no NVRTC library loads (set QPIPE_NVRTC to its file); tried "
                                     + "; ".join(tried[:4]))  # fmt: skip
        return _NVRTC


def _preload_builtins(lib: ctypes.CDLL) -> None:
    """NVRTC opens its builtins library by name at compile time; where that library sits
    beside NVRTC but not on the loader's path (pip's nvidia wheels), load it first."""
    try:
        path = Path(_loaded_path(lib))
    except OSError:
        return
    for builtins in sorted(path.parent.glob("libnvrtc-builtins.so.*")):
        if ".alt." in builtins.name:
            continue
        try:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue


def _loaded_path(lib: ctypes.CDLL) -> str:
    """The file a loaded library came from (its name may be a bare soname)."""
    if os.path.sep in lib._name:
        return lib._name
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libnvrtc.so" in line and "builtins" not in line:
                return line.split()[-1]
    raise OSError("libnvrtc's file not found in the process maps")


def nvrtc_version() -> tuple[int, int]:
    lib = nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _check_nvrtc(lib: ctypes.CDLL, result: int, what: str) -> None:
    if result != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(result).decode()}")


def _cache_dir() -> Path:
    return Path(os.environ.get("QPIPE_KERNEL_CACHE") or Path.home() / ".cache" / "qpipe" / "cubin")


def _write_whole(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def compile_cubin(
    source: str, name_exprs: list[str], arch: str, options: tuple[str, ...] = ()
) -> tuple[bytes, dict[str, str]]:
    """(cubin for sm_<arch>, {name expression: lowered symbol}): the source compiled once with
    every template instantiation named. Cached on disk."""
    lib = nvrtc()
    key = hashlib.sha256(
        json.dumps([source, name_exprs, arch, list(options), nvrtc_version()]).encode()
    ).hexdigest()[:32]
    cubin_path = _cache_dir() / f"{key}.cubin"
    names_path = _cache_dir() / f"{key}.json"
    try:
        return cubin_path.read_bytes(), json.loads(names_path.read_text())
    except (OSError, ValueError):
        pass
    prog = ctypes.c_void_p()
    _check_nvrtc(
        lib,
        lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"qpipe.cu", 0, None, None),
        "create",
    )
    try:
        for expr in name_exprs:
            _check_nvrtc(lib, lib.nvrtcAddNameExpression(prog, expr.encode()), "name")
        opts = [f"--gpu-architecture=sm_{arch}", "-std=c++17", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        result = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC compile failed:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = {}
        for expr in name_exprs:
            name = ctypes.c_char_p()
            _check_nvrtc(
                lib, lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(name)), "lowered"
            )
            lowered[expr] = name.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    data = cubin.raw
    try:
        _write_whole(cubin_path, data)
        _write_whole(names_path, json.dumps(lowered).encode())
    except OSError:
        pass  # a read-only home: compile again next time
    return data, lowered


# -- the driver --------------------------------------------------------------------------------


def cuda() -> ctypes.CDLL:
    global _CUDA
    with _LOCK:
        if _CUDA is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as err:
                raise RtcUnavailable(f"no CUDA driver library: {err}") from err
            lib.cuLaunchKernel.argtypes = [
                ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
            ]  # fmt: skip
            lib.cuLaunchKernel.restype = ctypes.c_int
            _CUDA = lib
        return _CUDA


def check_cuda(result: int, what: str) -> None:
    if result != 0:
        lib = cuda()
        text = ctypes.c_char_p()
        lib.cuGetErrorString(result, ctypes.byref(text))
        raise RuntimeError(f"CUDA {what}: error {result} ({(text.value or b'?').decode()})")


class Kernel:
    """One compiled kernel, loaded into each device's context on first use there."""

    def __init__(self, cubin: bytes, symbol: str) -> None:
        self._cubin = cubin
        self._symbol = symbol
        self._functions: dict[int, ctypes.c_void_p] = {}
        self._modules: list[ctypes.c_void_p] = []  # kept: unloading them would free the code

    def function(self, device: torch.device) -> ctypes.c_void_p:
        index = device.index if device.index is not None else torch.cuda.current_device()
        fn = self._functions.get(index)
        if fn is None:
            lib = cuda()
            with torch.cuda.device(index):
                torch.cuda.current_stream()  # torch's state on this device exists
                _make_primary_current(lib, index)
                module, fn = ctypes.c_void_p(), ctypes.c_void_p()
                check_cuda(lib.cuModuleLoadData(ctypes.byref(module), self._cubin), "module load")
                check_cuda(
                    lib.cuModuleGetFunction(ctypes.byref(fn), module, self._symbol.encode()),
                    "get function",
                )
            self._modules.append(module)
            self._functions[index] = fn
        return fn


def _make_primary_current(lib: ctypes.CDLL, index: int) -> None:
    """Device ``index``'s primary context (the one torch's runtime calls use) current on this
    thread for the driver calls that follow (a module belongs to the context it loads into)."""
    ctx = ctypes.c_void_p()
    check_cuda(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "current context")
    if ctx.value:
        dev = ctypes.c_int()
        check_cuda(lib.cuCtxGetDevice(ctypes.byref(dev)), "context device")
        if dev.value == index:
            return
    dev = ctypes.c_int()
    check_cuda(lib.cuDeviceGet(ctypes.byref(dev), index), "device")
    check_cuda(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "primary context")
    check_cuda(lib.cuCtxSetCurrent(ctx), "set context")


class BoundLaunch:
    """A kernel's launch with its argument array built once: ``pointers`` and ``ints`` in the
    kernel's parameter order (pointers first); ``__call__`` sets the listed pointer slots that
    change per call and launches on the current stream of ``device``."""

    def __init__(
        self,
        kernel: Kernel,
        device: torch.device,
        grid: tuple[int, int, int],
        block: int,
        pointers: list[int],
        ints: list[int],
    ) -> None:
        self._fn = kernel.function(device)
        self._lib = cuda()
        self._grid = grid
        self._block = block
        self._device = device
        self._index = device.index if device.index is not None else torch.cuda.current_device()
        self._vals = [ctypes.c_void_p(p) for p in pointers] + [ctypes.c_int(i) for i in ints]
        self._params = (ctypes.c_void_p * len(self._vals))(
            *[ctypes.addressof(v) for v in self._vals]
        )

    def set_pointer(self, slot: int, ptr: int) -> None:
        self._vals[slot].value = ptr

    def __call__(self) -> None:
        if torch.cuda.current_device() != self._index:  # the function lives in that context
            with torch.cuda.device(self._index):
                return self()
        stream = _raw_stream(self._index)
        g0, g1, g2 = self._grid
        result = self._lib.cuLaunchKernel(
            self._fn, g0, g1, g2, self._block, 1, 1, 0, stream, self._params, None
        )
        if result != 0:
            check_cuda(result, "launch")
        return None


def _raw_stream(index: int) -> int:
    """The current torch stream's handle on device ``index`` (without building a Stream)."""
    try:
        return torch._C._cuda_getCurrentRawStream(index)
    except AttributeError:  # another torch: the public, slower way
        return torch.cuda.current_stream(index).cuda_stream
