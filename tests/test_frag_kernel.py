"""The fragment-order W4A16 kernel (layout v3, ``qpipe/kernels/w4_frag.cu``) without a GPU.

* the layout: exact round trips between the three forms, and each nibble where the kernel's
  lanes look for it;
* a pure-torch emulation of what the kernel's MMAs compute from the fragment order (the
  PTX m16n8k16 register layouts) reproduces the matmul;
* the CUDA source itself, compiled by g++ with the PTX primitives in C++ and every CUDA thread
  a std::thread (``tests/frag_emulator.cpp``), under AddressSanitizer: every configuration
  shape the tuner uses, fp16 and bf16, symmetric and not, bias, split-K (uneven and with an
  empty split), M past one block, a strided x, against the float64 reference; outputs
  poisoned first, the split-K counters zero after;
* NVRTC (where a library is found: ``QPIPE_NVRTC``) compiles every instantiation the tuner
  can ask for, for sm_80 and sm_90;
* where the kernel cannot run, QuantLinear falls back to today's kernels (tiled, v2).
GPU tests (``-m gpu``) run the compiled kernel against the same reference.
"""

from __future__ import annotations

import functools
import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from qpipe.kernels.layout import (
    FRAG_K,
    form_of,
    frag_w4,
    pack_int4_rows,
    tile_w4,
    to_form,
    unfrag_w4,
    unpack_q,
)

ROOT = Path(__file__).resolve().parents[1]


def _q(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)  # fmt: skip


def test_forms_round_trip_exactly_and_nibbles_sit_where_the_lanes_read_them() -> None:
    n, k = 48, 256
    q = _q(n, k, 0)
    rows = pack_int4_rows(q)
    frag = frag_w4(rows)
    assert frag.shape == (n // 16, k // FRAG_K, 128) and form_of(frag, n) == "frag"
    assert torch.equal(unfrag_w4(frag), rows)
    assert torch.equal(unpack_q(frag, n, k), q)
    for a, b in itertools.permutations(("rows", "tiled", "frag"), 2):
        assert torch.equal(to_form(to_form(rows, n, a), n, b), to_form(rows, n, b)), (a, b)
    assert torch.equal(to_form(tile_w4(rows), n, "frag"), frag)
    # lane (g, t), word kk, nibble i: row 16 tile + g + 8 (i & 1), column 64 chunk + 16 t +
    # 4 kk + 2 ((i >> 1) & 1) + (i >> 2) (w4_frag.cu's comment), all at once
    tile, chunk, lane, kk, i = torch.meshgrid(
        *(torch.arange(v) for v in (n // 16, k // 64, 32, 4, 8)), indexing="ij"
    )
    g, t = lane // 4, lane % 4
    row = 16 * tile + g + 8 * (i & 1)
    col = 64 * chunk + 16 * t + 4 * kk + 2 * ((i >> 1) & 1) + (i >> 2)
    nib = (frag[tile, chunk, lane * 4 + kk] >> (4 * i)) & 0xF
    assert torch.equal(nib.to(torch.uint8), q[row, col])


def _dequant_ref(q, scales, zeros, gs, dtype) -> torch.Tensor:
    """[N, K] float64 weights as the kernel's operands hold them: (q - z) * s rounded once to
    the activation dtype (the torch reference's weights)."""
    n, k = q.shape
    grp = torch.arange(k) // gs
    z = 8.0 if zeros is None else zeros.double().t()[:, grp]
    return ((q.double() - z) * scales.double().t()[:, grp]).to(dtype).double()


def test_torch_emulation_of_the_mma_fragments_reproduces_the_matmul() -> None:
    """What w4_frag.cu's lanes feed mma.m16n8k16, assembled from the fragment-order words with
    PTX's register layouts (A: a0 = (row g, k 2t..2t+1), a1 = row g + 8, a2/a3 = k + 8; B: b0 =
    (k 2t..2t+1, col g), b1 = k + 8), equals x @ W.T."""
    n, k, m, gs = 32, 256, 8, 128
    q = _q(n, k, 1)
    gen = torch.Generator().manual_seed(1)
    scales = torch.rand(k // gs, n, generator=gen) * 0.02 + 0.002
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen)
    x = torch.randn(m, k, generator=gen).double()
    w = _dequant_ref(q, scales, zeros, gs, torch.float64)
    frag = frag_w4(pack_int4_rows(q))
    y = torch.zeros(m, n, dtype=torch.float64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    for tile, chunk, kk in itertools.product(range(n // 16), range(k // 64), range(4)):
        words = frag[tile, chunk, lane * 4 + kk]  # one word per lane
        nib = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=1)  # [lane, i]
        rows = 16 * tile + g[:, None] + 8 * (torch.arange(8) & 1)
        cols = (
            64 * chunk
            + 16 * t[:, None]
            + 4 * kk
            + 2 * ((torch.arange(8) >> 1) & 1)
            + (torch.arange(8) >> 2)
        )
        grp = cols // gs
        val = (nib.double() - zeros.t()[rows, grp]) * scales.t()[rows, grp].double()
        a = torch.zeros(16, 16, dtype=torch.float64)  # logical A[row][k] of this k16 step
        b = torch.zeros(16, m, dtype=torch.float64)  # logical B[k][activation row]
        for ln in range(32):
            gg, tt = ln // 4, ln % 4
            # nibble i -> register (i & 1) + 2 ((i >> 1) & 1), half i >> 2 (a0 .. a3 above)
            for i in range(8):
                r = gg + 8 * (i & 1)
                kl = 2 * tt + (i >> 2) + 8 * ((i >> 1) & 1)
                a[r, kl] = val[ln, i]
                # B: the same logical k from the same physical column of x
                b[kl, :] = x[:, int(cols[ln, i])]
        y[:, 16 * tile : 16 * tile + 16] += (a @ b).t()
    assert torch.allclose(y, x @ w.t(), rtol=1e-9, atol=1e-9)


# -- the CUDA source on the CPU ---------------------------------------------------------------


@functools.cache
def _emulator(tmp: Path) -> Path:
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ to compile the CUDA source for the CPU")
    exe = tmp / "frag_emulator"
    base = [cxx, "-std=c++20", "-O0", "-w", "-pthread", str(ROOT / "tests" / "frag_emulator.cpp")]
    sanitized = subprocess.run([*base, "-fsanitize=address,undefined", "-o", str(exe)],
                               capture_output=True, text=True)  # fmt: skip
    if sanitized.returncode != 0:  # no sanitizer runtime here: the plain build still checks
        plain = subprocess.run([*base, "-o", str(exe)], capture_output=True, text=True)
        assert plain.returncode == 0, plain.stderr[-3000:]
    return exe


# (M, N, K, group, bf16, zeros, bias, (T, R, WARPS, P), split, x row stride or None)
EMULATED = [
    (1, 64, 256, 128, False, False, False, (1, 1, 4, 4), 1, None),
    (3, 96, 512, 128, True, True, True, (1, 2, 4, 2), 3, None),  # partial R tile, uneven split
    (8, 48, 256, 64, False, True, False, (1, 1, 2, 3), 3, 264),  # empty split, strided x
    (16, 64, 384, 64, False, True, True, (2, 1, 4, 3), 2, None),
    (13, 80, 256, 256, True, False, True, (2, 2, 2, 2), 1, None),  # N past the last block
    (32, 32, 256, 128, True, True, False, (4, 1, 4, 2), 2, None),
    (33, 48, 256, 128, True, False, False, (8, 1, 2, 2), 1, None),  # M past one 8T block
    (64, 128, 512, 128, False, True, True, (8, 2, 4, 1), 4, None),
]


def _write_case(path: Path, case, seed: int):
    m, n, k, gs, bf16, has_z, has_bias, (t, r, w, p), split, sxm = case
    gen = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16 if bf16 else torch.float16
    groups = k // gs
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (groups, n), generator=gen, dtype=torch.uint8) if has_z else None
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).to(dt)
    bias = torch.randn(n, generator=gen).to(dt) if has_bias else None
    from qpipe.kernels.frag_w4a16 import FragConfig, geometry

    sxm = sxm or k
    x_full = torch.randn(m, sxm, generator=gen).to(dt)
    # the launch exactly as the Python side plans it for the GPU
    cfg = FragConfig(t=t, r=r, warps=w, prefetch=p, split_k=split)
    grid, block, ints = geometry(m, n, k, sxm, gs, cfg)
    assert ints[:4] == [m, n, k, sxm] and ints[5] == split
    header = [m, n, k, gs, int(bf16), int(has_z), int(has_bias), t, r, w, p, split, ints[6], sxm,
              *grid, block, ints[4]]  # fmt: skip
    with open(path, "wb") as f:
        f.write(struct.pack("<19i", *header))
        f.write(x_full.view(torch.int16).numpy().tobytes())
        f.write(frag_w4(pack_int4_rows(q)).numpy().tobytes())
        f.write(scales.view(torch.int16).numpy().tobytes())
        if zeros is not None:
            f.write(zeros.numpy().tobytes())
        if bias is not None:
            f.write(bias.view(torch.int16).numpy().tobytes())
    ref = x_full[:, :k].double() @ _dequant_ref(q, scales, zeros, gs, dt).t()
    if bias is not None:
        ref = ref + bias.double()
    return ref, dt, grid[0] * grid[2]


@pytest.mark.parametrize("case", EMULATED, ids=[f"m{c[0]}_{'x'.join(map(str, c[7]))}_s{c[8]}"
                                                 for c in EMULATED])  # fmt: skip
def test_cuda_source_computes_the_reference_on_the_cpu_emulator(case, tmp_path_factory) -> None:
    exe = _emulator(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("frag")
    ref, dt, tiles = _write_case(work / "case.bin", case, seed=EMULATED.index(case))
    proc = subprocess.run([str(exe), str(work / "case.bin"), str(work / "out.bin")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = (work / "out.bin").read_bytes()
    m, n = ref.shape
    y = torch.frombuffer(bytearray(data[: m * n * 2]), dtype=torch.int16).view(dt).view(m, n)
    counters = torch.frombuffer(bytearray(data[m * n * 2 :]), dtype=torch.int32)
    assert bool(torch.isfinite(y).all()), "an output was never written (the poison is NaN)"
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < (2e-3 if dt == torch.float16 else 1e-2), rel
    assert counters.numel() == tiles and bool((counters == 0).all()), counters


# -- the dense prefill path (frag_dense): w4_frag_dequant + cuBLAS ----------------------------

# (N, K, group, bf16, zeros, first row tile, row tiles)
DEQUANT = [
    (48, 256, 128, False, True, 0, 3),  # every row, two groups
    (64, 384, 64, True, False, 1, 2),  # rows 16..48, six groups, symmetric
    (32, 512, 256, False, False, 1, 1),  # the last tile only
    (48, 256, 64, True, True, 1, 2),  # the chunk ending at N
]


@pytest.mark.parametrize("case", DEQUANT, ids=[f"n{c[0]}k{c[1]}g{c[2]}_{'bf16' if c[3] else 'f16'}"
                                                 f"_z{int(c[4])}" for c in DEQUANT])  # fmt: skip
def test_cuda_dequant_writes_the_reference_weights_bit_for_bit(case, tmp_path_factory) -> None:
    """``w4_frag_dequant`` (the CUDA source, on the emulator under ASan) writes exactly the
    rows ``frag_dense.reference_rows`` computes: (q - z) * s rounded once, every bit."""
    from qpipe.kernels.frag_dense import dequant_geometry, reference_rows

    n, k, gs, bf16, has_z, rt0, tiles = case
    exe = _emulator(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("dequant")
    gen = torch.Generator().manual_seed(DEQUANT.index(case))
    dt = torch.bfloat16 if bf16 else torch.float16
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen, dtype=torch.uint8) if has_z else None
    # scales of both signs and magnitudes, so rounding and sign paths are all exercised
    scales = ((torch.rand(k // gs, n, generator=gen) - 0.3) * 0.05).to(dt)
    qw = frag_w4(pack_int4_rows(q))
    blocks, threads = dequant_geometry(k, 16 * tiles)
    shift = (gs // FRAG_K).bit_length() - 1
    with open(work / "case.bin", "wb") as f:
        f.write(struct.pack("<10i", n, k, gs, int(bf16), int(has_z), rt0, tiles, blocks, threads,
                            shift))  # fmt: skip
        f.write(qw.numpy().tobytes())
        f.write(scales.view(torch.int16).numpy().tobytes())
        if zeros is not None:
            f.write(zeros.numpy().tobytes())
    proc = subprocess.run([str(exe), "--dequant", str(work / "case.bin"), str(work / "w.bin")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.frombuffer(bytearray((work / "w.bin").read_bytes()), dtype=torch.int16)
    want = torch.empty(16 * tiles, k, dtype=dt)
    reference_rows(qw, scales, zeros, gs, 16 * rt0, want)
    assert torch.equal(got.view(16 * tiles, k), want.view(torch.int16))
    # and the reference is the layer's own dequantization (layout.dequantize_kernel_order)
    ref = _dequant_ref(q, scales, zeros, gs, dt)[16 * rt0 : 16 * (rt0 + tiles)]
    assert torch.equal(want.double(), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_path_multiplies_chunk_by_chunk_into_the_output_columns(dtype) -> None:
    """frag_dense.launch: chunks of rows (the last one short), each GEMM into its columns of
    y, bias and zeros or not, equal to the product with the reference weights."""
    from qpipe.kernels import frag_dense
    from qpipe.kernels.tuning import _config_of, _launch_any

    n, k, m, gs = 80, 256, 37, 128
    gen = torch.Generator().manual_seed(7)
    q = _q(n, k, 7)
    qw = frag_w4(pack_int4_rows(q))
    scales = (torch.rand(k // gs, n, generator=gen) * 0.02 + 0.002).to(dtype)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen, dtype=torch.uint8)
    bias = torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for z, b, rows in ((zeros, bias, 32), (None, None, 48), (zeros, None, 80), (None, bias, 512)):
        ref = x.double() @ _dequant_ref(q, scales, z, gs, dtype).t()
        ref = ref if b is None else ref + b.double()
        cfg = _config_of(frag_dense.DenseConfig(chunk_rows=rows).as_dict())  # as stored
        y = _launch_any(x, qw, scales, z, gs, b, cfg)
        rel = float((y.double() - ref).norm() / ref.norm())
        assert y.dtype == dtype and rel < tol, (rows, rel)
    with pytest.raises(ValueError, match="multiple of 16"):
        frag_dense.launch(x, qw, scales, None, gs, None, frag_dense.DenseConfig(chunk_rows=40))
    with pytest.raises(ValueError, match="groups of 64"):
        frag_dense.launch(x, qw, scales, None, 96, None, frag_dense.DenseConfig())


def test_tuner_offers_the_dense_path_from_its_crossover(monkeypatch) -> None:
    """The heuristic takes the dense path from DENSE_MIN_M rows; the tuner times it beside the
    fragment kernel from TUNE_MIN_M rows, with chunks that fit MAX_CHUNK_BYTES; a dense choice
    binds no direct launcher (QuantLinear runs it through the op's path)."""
    from qpipe.kernels import frag_dense, frag_w4a16
    from qpipe.kernels.tuning import frag_candidates, frag_heuristic

    monkeypatch.setattr(frag_w4a16, "_num_sms", lambda device: 132)  # an H100's count
    dev = torch.device("cuda")
    n, k = 4096, 4096
    for m in (1, 4, 16):
        assert frag_heuristic(m, n, k, dev).kind == "frag"
        assert {c.kind for c in frag_candidates(m, n, k, dev)} == {"frag"}
    for m in (64, 256, 4096):  # where the dense path's self-check failed: the kernel only
        assert frag_heuristic(m, n, k, dev, dense=False).kind == "frag"
        assert {c.kind for c in frag_candidates(m, n, k, dev, dense=False)} == {"frag"}
    for m in (frag_dense.TUNE_MIN_M, 64):
        assert {c.kind for c in frag_candidates(m, n, k, dev)} == {"frag", "dense"}
    assert frag_heuristic(frag_dense.DENSE_MIN_M - 1, n, k, dev).kind == "frag"
    for m in (frag_dense.DENSE_MIN_M, 2048):
        base = frag_heuristic(m, n, k, dev)
        assert base.kind == "dense" and base in frag_candidates(m, n, k, dev)
    dense = [c for c in frag_candidates(256, n, k, dev) if c.kind == "dense"]
    assert [c.chunk_rows for c in dense] == [1024, 2048, 4096]  # 8, 16, 32 MiB of 4096 columns
    for n2, k2 in ((28672, 8192), (3584, 18944), (64, 128)):
        for c in frag_dense.candidates(256, n2, k2):
            assert c.chunk_rows % 16 == 0 and 16 <= c.chunk_rows <= n2
            assert c.chunk_rows * k2 * 2 <= frag_dense.MAX_CHUNK_BYTES


# -- NVRTC ------------------------------------------------------------------------------------


def test_nvrtc_compiles_every_instantiation_the_tuner_uses(tmp_path, monkeypatch) -> None:
    from qpipe.kernels import cuda_rtc, frag_dense, frag_w4a16

    try:
        cuda_rtc.nvrtc()
    except cuda_rtc.RtcUnavailable as err:
        pytest.skip(f"no NVRTC here ({err}"[:200] + ")")
    monkeypatch.setenv("QPIPE_KERNEL_CACHE", str(tmp_path))
    shapes = [(t, *shape) for t, some in frag_w4a16._SHAPES.items() for shape in some]
    flags = list(itertools.product((False, True), repeat=3))  # bf16, zeros, bias
    exprs = [  # every shape with two flag sets, the first shape with all eight
        frag_w4a16._expr(frag_w4a16.FragConfig(t=t, r=r, warps=w, prefetch=p), *f)
        for i, (t, r, w, p) in enumerate(shapes)
        for f in (flags if i == 0 else [flags[0], flags[-1]])
    ]
    exprs += [frag_dense._expr(*f) for f in itertools.product((False, True), repeat=2)]
    for arch in ("80", "90"):
        cubin, lowered = cuda_rtc.compile_cubin(frag_w4a16._source(), exprs, arch)
        assert len(cubin) > 10_000 and set(lowered) == set(exprs)
        assert all(name.startswith(("_Z14w4_frag_kernel", "_Z15w4_frag_dequant"))
                   for name in lowered.values())  # fmt: skip
    # cached: a second call reads the files
    assert cuda_rtc.compile_cubin(frag_w4a16._source(), exprs, "90")[0] == cubin


# -- where it cannot run ----------------------------------------------------------------------


def test_fragment_weights_fall_back_to_tiles_where_the_kernel_cannot_run(monkeypatch) -> None:
    from qpipe.kernels import QuantLinear, frag_w4a16, quantize_rtn
    from qpipe.kernels.quant_linear import default_form

    assert frag_w4a16.unavailable(torch.device("cpu")) == "the fragment kernel needs a CUDA device"
    iw = quantize_rtn(torch.randn(64, 256), group_size=128, symmetric=False)
    assert default_form(64, 32, 128) == "tiled"  # opt-in: QPIPE_FRAG=1
    monkeypatch.setenv("QPIPE_FRAG", "1")
    ql = QuantLinear.from_int(iw, dtype=torch.float16)
    assert ql.form == "frag" and default_form(64, 32, 128) == "frag"
    assert default_form(40, 32, 128) == "rows"  # no whole tiles
    before = ql.dequantize()
    ql._settle_form(torch.device("cpu"))  # what the first triton call does on such a device
    assert ql.form == "tiled" and torch.equal(ql.dequantize(), before)
    monkeypatch.setenv("QPIPE_FRAG", "0")
    assert default_form(64, 32, 128) == "tiled"
    assert QuantLinear.from_int(iw, dtype=torch.float16).form == "tiled"


# -- GPU --------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 33, 64, 130])
def test_gpu_frag_kernel_every_config_matches_reference(dtype, m) -> None:
    """Every configuration the tuner may time: the fragment kernel's and, from
    frag_dense.TUNE_MIN_M rows on, the dense prefill path's chunk sizes."""
    from qpipe.kernels import frag_dense, frag_w4a16
    from qpipe.kernels.tuning import _launch_any, frag_candidates
    from qpipe.kernels.workspace import WORKSPACE

    reason = frag_w4a16.unavailable(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    assert frag_dense.unavailable(torch.device("cuda")) is None  # its self-check passed
    n, k, gs = 1040, 2048, 128  # N not a multiple of any block's rows
    gen = torch.Generator().manual_seed(m)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // gs, n, generator=gen) * 0.02 + 0.002).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    ref = x.double() @ _dequant_ref(q, scales, zeros, gs, dtype).t() + bias.double()
    qw = frag_w4(pack_int4_rows(q)).cuda()
    args = (scales.cuda(), zeros.cuda(), gs, bias.cuda())
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    space = frag_candidates(m, n, k, torch.device("cuda"))
    assert ("dense" in {c.kind for c in space}) == (m >= frag_dense.TUNE_MIN_M)
    space += [frag_dense.DenseConfig(chunk_rows=r) for r in (16, 512)]  # short last chunks
    for cfg in space:
        for z in (args[1], None):
            want = ref if z is not None else (
                x.double() @ _dequant_ref(q, scales, None, gs, dtype).t() + bias.double()
            )  # fmt: skip
            y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            _launch_any(x.cuda(), qw, args[0], z, gs, args[3], cfg, out=y)
            torch.cuda.synchronize()
            rel = float((y.double().cpu() - want).norm() / want.norm())
            assert bool(torch.isfinite(y).all()) and rel < tol, (cfg, z is None, rel)
    _, cnt = WORKSPACE._bufs[torch.device("cuda", torch.cuda.current_device())]
    assert bool((cnt == 0).all())


@gpu
@pytest.mark.gpu
def test_gpu_quant_linear_runs_the_frag_kernel_eager_graph_and_compiled(monkeypatch) -> None:
    from qpipe.kernels import QuantLinear, frag_w4a16
    from qpipe.kernels.frag_w4a16 import FragLauncher

    monkeypatch.setenv("QPIPE_FRAG", "1")
    if frag_w4a16.unavailable(torch.device("cuda")) is not None:
        pytest.skip(frag_w4a16.unavailable(torch.device("cuda")))
    lin = torch.nn.Linear(2048, 768, dtype=torch.bfloat16, device="cuda")
    ql = QuantLinear.from_linear(lin, group_size=128, symmetric=False, kernel="triton")
    assert ql.form == "frag"
    x = torch.randn(4, 2048, dtype=torch.bfloat16, device="cuda")
    ref = x.double() @ ql.dequantize().double().t() + lin.bias.double()
    y = ql(x)
    assert isinstance(next(iter(ql._launchers.values())), FragLauncher)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(ql(x), y)  # the bound launch: the same bits again
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = ql(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = x.double() @ ql.dequantize().double().t() + lin.bias.double()
    assert float((yg.double() - ref).norm() / ref.norm()) < 1e-2
    compiled = torch.compile(ql, fullgraph=True)
    assert torch.equal(compiled(x), ql(x))
