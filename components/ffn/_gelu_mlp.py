"""The GELU MLP with the activation inside the matmuls: cuBLASLt's GELU and dGELU epilogues.

``y = W2 gelu_tanh(W1 x + b1) + b2``, x (M, D) -> (M, D'). Compiled, the usual path runs the
activation as its own kernels: a pass over the (M, H) pre-activation in the forward and two in
the backward (the GELU gradient and the bias gradient's reduction), 5.5 ms of a 67.8 ms GPT-2
124M step on an H100 (``benchmarks/gpt2_speed.py --profile``, 2026-11-22). Here::

    forward:   g = gelu(x W1^T + b1), pre = x W1^T + b1   # one cuBLASLt matmul, GELU_AUX_BIAS epilogue
               y = g W2^T + b2                           # cuBLAS (bias in the epilogue)
    backward:  dpre = (dy W2) * gelu'(pre)               # one cuBLASLt matmul, DGELU epilogue
               db1 = dpre^T 1, db2 = dy^T 1               # GEMVs (faster than sum(0) on an H100)
               dW2 = dy^T g, dW1 = dpre^T x, dx = dpre W1  # cuBLAS

At GPT-2's MLP (32768 tokens, 768 -> 3072) on an H100 the MLP's kernels take 1.81-1.89 ms per
forward + backward against 1.99-2.00 ms with the GELU as its own kernels, and the whole
GPT-2 step 63.6-64.8 ms against 66.1-66.8 ms (``benchmarks/gelu_mlp.py --profile``,
``benchmarks/gpt2_speed.py``). Other splits measured there and kept as ``OPTIONS``: the bias
gradient in the DGELU epilogue (DGELU_BGRAD) runs as a separate slow cuBLASLt kernel, 1.16x
the unfused MLP; the plain matmuls through cuBLASLt, with or without the bias gradients in
their epilogues, are no faster than cuBLAS.

cuBLASLt's GELU is the tanh approximation (GPT-2's own activation; Hugging Face's ``gelu_new``),
so only ``approximate="tanh"`` MLPs take this path. llm.c trains GPT-2 with the same two
epilogues. Without cuBLASLt (CPU, a CPU-only torch) the same operation runs in torch with the
same saved tensors and gradients, so the autograd wiring is tested everywhere and the cuBLASLt
calls on GPUs. Saved for the backward: x, g and pre (the compiled path saves pre and recomputes
g, so this keeps one (M, H) tensor more per layer).

cuBLASLt is reached through ctypes: torch links it (the ``nvidia-cublas`` wheel) but exposes no
epilogue besides GELU-without-aux (``torch._addmm_activation``). The handle, a 32 MiB workspace
per device and one descriptor set per shape are created once; the calls go on torch's current
stream, so they are captured by CUDA graphs like any other kernel. The first call of each shape
times the heuristic's candidate algorithms and keeps the fastest (``OPTIONS["timed_choice"]``;
``benchmarks/gelu_mlp.py`` compares it with the heuristic's first choice); under
``torch.use_deterministic_algorithms`` the first choice is kept, the same in every run. ``PHYSLM_FUSED_GELU=0`` in the
environment turns the fused path off.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import torch
from torch import Tensor

from physlm_graph._errors import PhysLMError

# cublasLt.h (CUDA 12/13)
_COMPUTE_32F = 68
_R_32F, _R_16F, _R_16BF = 0, 2, 14
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_PREF_MAX_WORKSPACE = 1
EPI_DEFAULT, EPI_BIAS = 1, 4
EPI_GELU_AUX, EPI_GELU_AUX_BIAS = 160, 164
EPI_DGELU, EPI_DGELU_BGRAD = 192, 208
EPI_BGRADA, EPI_BGRADB = 256, 512
_WORKSPACE = 32 << 20
_CANDIDATES = 16  # algorithms asked of the heuristic and timed on first use of a shape
_TIMED_MIN_MACS = 1 << 30  # below this m*n*k the heuristic's first choice is kept
_MAX_PLANS = 256
_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}


def _library_path(name: str) -> str | None:
    """A CUDA library as torch loaded it (or the nvidia wheels' copy); None without CUDA."""
    if sys.platform != "linux" or torch.version.cuda is None:
        return None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if f"{name}.so" in line:
                    return line.split()[-1]
    except OSError:
        pass
    for base in sys.path:
        hits = sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", f"{name}.so*")))
        if hits:
            return hits[-1]
    return f"{name}.so"  # the loader's search path


_PATH = _library_path("libcublasLt")
#: cuBLASLt can be reached (a CUDA build of torch); whether a GPU is present is checked per call.
AVAILABLE = _PATH is not None and os.environ.get("PHYSLM_FUSED_GELU", "1") != "0"


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class _CublasLt:
    """One cuBLASLt handle; ``gemm`` writes ``out = op(a) @ op(b)`` (row-major) with an epilogue."""

    def __init__(self, path: str) -> None:
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise PhysLMError(f"fused GELU MLP: cannot load cuBLASLt ({path}): {e}; "
                              "set PHYSLM_FUSED_GELU=0 to use the unfused path") from None
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        sig = {
            "cublasLtCreate": [ctypes.POINTER(vp)],
            "cublasLtMatmulDescCreate": [ctypes.POINTER(vp), ctypes.c_int, ctypes.c_int],
            "cublasLtMatmulDescSetAttribute": [vp, ctypes.c_int, vp, sz],
            "cublasLtMatrixLayoutCreate": [ctypes.POINTER(vp), ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                                           ctypes.c_int64],
            "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(vp)],
            "cublasLtMatmulPreferenceSetAttribute": [vp, ctypes.c_int, vp, sz],
            "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int,
                                               ctypes.POINTER(_Heuristic), ctypes.POINTER(ctypes.c_int)],
            "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp],
            "cublasLtMatmulDescDestroy": [vp],
            "cublasLtMatrixLayoutDestroy": [vp],
            "cublasLtMatmulPreferenceDestroy": [vp],
        }
        for name, args in sig.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self.handle = vp()
        self._check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace: dict[int, int] = {}
        self.cudart: ctypes.CDLL | None = None
        self.plans: dict[tuple, tuple] = {}
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise PhysLMError(f"fused GELU MLP: {what} failed with cuBLAS status {status}; "
                              "set PHYSLM_FUSED_GELU=0 to use the unfused path")

    def _set(self, fn, obj, attr: int, value: ctypes._SimpleCData) -> None:
        self._check(fn(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")

    def _layout(self, dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        lay = ctypes.c_void_p()
        self._check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype, rows, cols, ld), "layout")
        return lay

    def _plan(self, key: tuple, bias_ptr: int, aux_ptr: int) -> tuple:
        """Descriptor, layouts and the heuristic's first algorithm for one shape (cached)."""
        if key in self.plans:
            return self.plans[key]
        dtype, ta, tb, m, n, k, epi, _, _, ws = key
        lib = self.lib
        desc = ctypes.c_void_p()
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "descriptor")
        # column-major view: out^T (n x m) = op(b)^T (n x k) @ op(a)^T (k x m)
        self._set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSA, ctypes.c_int(_OP_T if tb else _OP_N))
        self._set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSB, ctypes.c_int(_OP_T if ta else _OP_N))
        self._set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_EPILOGUE, ctypes.c_int(epi))
        if aux_ptr:
            self._set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_LD, ctypes.c_int64(n))
        lay_b = self._layout(dtype, k, n, k) if tb else self._layout(dtype, n, k, n)  # b: (n, k) or (k, n) row-major
        lay_a = self._layout(dtype, m, k, m) if ta else self._layout(dtype, k, m, k)  # a: (k, m) or (m, k) row-major
        lay_d = self._layout(dtype, n, m, n)
        # the heuristic reads the pointers' alignment from the descriptor: set representative ones
        self._pointers(desc, bias_ptr, aux_ptr)
        pref = ctypes.c_void_p()
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        self._set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE, ctypes.c_uint64(ws))
        results, count = (_Heuristic * _CANDIDATES)(), ctypes.c_int(0)
        status = lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, lay_b, lay_a, lay_d, lay_d, pref,
                                                    _CANDIDATES, results, ctypes.byref(count))
        lib.cublasLtMatmulPreferenceDestroy(pref)
        self._check(status, "heuristic")
        algos = [results[i] for i in range(count.value) if results[i].state == 0]
        if m * n * k < _TIMED_MIN_MACS:
            algos = algos[:1]  # small products (decoding, odd batches): not worth timing
        if len(self.plans) >= _MAX_PLANS:  # many shapes (dynamic lengths): start the cache afresh
            for old in self.plans.values():
                lib.cublasLtMatmulDescDestroy(old[0])
                for lay in old[1:4]:
                    lib.cublasLtMatrixLayoutDestroy(lay)
            self.plans.clear()
        if not algos:
            raise PhysLMError(f"fused GELU MLP: cuBLASLt has no algorithm for epilogue {epi} at "
                              f"m={m} n={n} k={k}; set PHYSLM_FUSED_GELU=0 to use the unfused path")
        plan = [desc, lay_b, lay_a, lay_d, algos]
        self.plans[key] = plan
        return plan

    def _pointers(self, desc, bias_ptr: int, aux_ptr: int) -> None:
        if bias_ptr:
            self._set(self.lib.cublasLtMatmulDescSetAttribute, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias_ptr))
        if aux_ptr:
            self._set(self.lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux_ptr))

    def _workspace(self, device: torch.device) -> int:
        """The device's workspace address. cudaMalloc, not torch's allocator: inside torch.compile's
        CUDA-graph trees a tensor made on first use would land in a graph's pool, untracked."""
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self.workspace:
            if self.cudart is None:
                self.cudart = ctypes.CDLL(_library_path("libcudart") or "libcudart.so")
                self.cudart.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
                self.cudart.cudaMalloc.restype = ctypes.c_int
            ptr = ctypes.c_void_p()
            with torch.cuda.device(idx):
                status = self.cudart.cudaMalloc(ctypes.byref(ptr), _WORKSPACE)
            if status != 0:
                raise PhysLMError(f"fused GELU MLP: cudaMalloc of the {_WORKSPACE >> 20} MiB cuBLASLt workspace "
                                  f"failed (CUDA error {status})")
            self.workspace[idx] = ptr.value  # kept for the process's life
        return self.workspace[idx]

    def gemm(self, out: Tensor, a: Tensor, b: Tensor, *, trans_a: bool = False, trans_b: bool = False,
             epilogue: int = EPI_DEFAULT, bias: Tensor | None = None, aux: Tensor | None = None) -> None:
        m, n = out.shape
        k = a.shape[0] if trans_a else a.shape[1]
        for t in (out, a, b, bias, aux):
            if t is not None and (not t.is_contiguous() or t.data_ptr() % 16):
                raise PhysLMError("fused GELU MLP: cuBLASLt needs contiguous, 16-byte aligned operands")
        work, ws = self._workspace(out.device), _WORKSPACE
        bias_ptr = bias.data_ptr() if bias is not None else 0
        aux_ptr = aux.data_ptr() if aux is not None else 0
        # the key records whether bias/aux are used, not their addresses (all 16-byte aligned)
        key = (_DTYPES[out.dtype], trans_a, trans_b, m, n, k, epilogue, bias is not None, aux is not None, ws)
        plan = self._plan(key, bias_ptr, aux_ptr)
        desc, lay_b, lay_a, lay_d, algos = plan
        self._pointers(desc, bias_ptr, aux_ptr)
        stream = torch.cuda.current_stream(out.device)

        def launch(algo: _Heuristic) -> None:
            self._check(self.lib.cublasLtMatmul(
                self.handle, desc, ctypes.byref(self.alpha), b.data_ptr(), lay_b, a.data_ptr(), lay_a,
                ctypes.byref(self.beta), out.data_ptr(), lay_d, out.data_ptr(), lay_d, ctypes.byref(algo.algo),
                work, ws, stream.cuda_stream), "cublasLtMatmul")

        if (len(algos) > 1 and OPTIONS["timed_choice"] and not torch.cuda.is_current_stream_capturing()
                and not torch.are_deterministic_algorithms_enabled()):
            # the heuristic's first choice for epilogue kernels is often not the fastest: time each
            # candidate once on these operands (outputs are overwritten by the final launch below)
            best = min(algos, key=lambda algo: _time(launch, algo, stream))
            plan[4] = algos = [best]
        elif len(algos) > 1:
            plan[4] = algos = algos[:1]  # fixed from now on
        launch(algos[0])


def _time(launch, algo, stream) -> float:
    try:
        launch(algo)  # warm-up
    except PhysLMError:
        return float("inf")  # offered by the heuristic, refused at launch: not a candidate
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    for _ in range(3):
        launch(algo)
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end)


_LT: _CublasLt | None = None

#: how the GPU path is split into calls (benchmarks/gelu_mlp.py compares them):
#: ``bgrad_epilogue``: db1 from the DGELU_BGRAD epilogue instead of a torch sum;
#: ``lt_matmuls``: the plain matmuls too through cuBLASLt with timed algorithm choice, not torch's cuBLAS.
#: ``bgrad_wgrad`` (with ``lt_matmuls``): the bias gradients in the weight gradients' epilogues;
#: ``timed_choice``: time the heuristic's candidates on a shape's first call (else its first choice).
OPTIONS = {"bgrad_epilogue": False, "lt_matmuls": False, "bgrad_wgrad": False, "timed_choice": True}


def _lt() -> _CublasLt:
    global _LT
    if _LT is None:
        _LT = _CublasLt(_PATH or "libcublasLt.so")
    return _LT


def _gelu_fwd_torch(x: Tensor, w1: Tensor, b1: Tensor | None) -> tuple[Tensor, Tensor]:
    pre = torch.nn.functional.linear(x, w1, b1)
    return torch.nn.functional.gelu(pre, approximate="tanh"), pre


def _fwd_impl(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None
              ) -> tuple[Tensor, Tensor, Tensor]:
    if x.is_cuda:
        g = x.new_empty((x.shape[0], w1.shape[0]))
        pre = torch.empty_like(g)
        _lt().gemm(g, x, w1, trans_b=True, epilogue=EPI_GELU_AUX_BIAS if b1 is not None else EPI_GELU_AUX,
                   bias=b1, aux=pre)
        if OPTIONS["lt_matmuls"]:
            y = x.new_empty((x.shape[0], w2.shape[0]))
            _lt().gemm(y, g, w2, trans_b=True, epilogue=EPI_BIAS if b2 is not None else EPI_DEFAULT, bias=b2)
            return y, g, pre
    else:
        g, pre = _gelu_fwd_torch(x, w1, b1)
    return torch.nn.functional.linear(g, w2, b2), g, pre


@torch.library.custom_op("physlm_graph::gelu_mlp_fwd", mutates_args=())
def _fwd_op(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None
            ) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd_impl(x, w1, b1, w2, b2)


@_fwd_op.register_fake
def _(x, w1, b1, w2, b2):
    h = x.new_empty((x.shape[0], w1.shape[0]))
    return x.new_empty((x.shape[0], w2.shape[0])), h, torch.empty_like(h)


def _colsum(a: Tensor) -> Tensor:
    """Column sums of a (tokens, width) matrix as a GEMV: 0.073 against 0.085 ms for ``sum(0)`` at
    (32768, 3072) bf16 on an H100 (``benchmarks/gelu_mlp.py --profile``)."""
    return torch.mv(a.t(), a.new_ones(a.shape[0]))


def _bwd_cuda(dy, x, w1, w2, g, pre, has_b1, has_b2):
    opt = OPTIONS
    dpre = torch.empty_like(pre)
    db1 = pre.new_empty(pre.shape[1]) if has_b1 and opt["bgrad_epilogue"] else None
    _lt().gemm(dpre, dy, w2, epilogue=EPI_DGELU if db1 is None else EPI_DGELU_BGRAD, bias=db1, aux=pre)
    db2 = None
    if opt["lt_matmuls"]:
        dx = x.new_empty(x.shape)
        _lt().gemm(dx, dpre, w1)
        dw1, db1 = _lt_wgrad(dpre, x, w1, db1, has_b1 and db1 is None and opt["bgrad_wgrad"])
        dw2, db2 = _lt_wgrad(dy, g, w2, None, has_b2 and opt["bgrad_wgrad"])
    else:
        dx, dw1, dw2 = dpre @ w1, dpre.t() @ x, dy.t() @ g
    db1 = _colsum(dpre) if has_b1 and db1 is None else db1
    db2 = _colsum(dy) if has_b2 and db2 is None else db2
    return dx, dw1, db1, dw2, db2


def _lt_wgrad(d: Tensor, a: Tensor, like: Tensor, db: Tensor | None, bgrad: bool) -> tuple[Tensor, Tensor | None]:
    """The weight gradient ``d^T a`` through cuBLASLt; with ``bgrad``, d's column sums (the bias
    gradient) from the same matmul's BGRADB epilogue, else ``db`` as given."""
    dw = torch.empty_like(like)
    if bgrad:
        db = d.new_empty(d.shape[1])
    _lt().gemm(dw, d, a, trans_a=True, epilogue=EPI_BGRADB if bgrad else EPI_DEFAULT, bias=db if bgrad else None)
    return dw, db


@torch.library.custom_op("physlm_graph::gelu_mlp_bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, g: Tensor, pre: Tensor, has_b1: bool, has_b2: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, dW1, db1, dW2, db2 (a bias absent: an empty tensor)."""
    if dy.is_cuda:
        dx, dw1, db1, dw2, db2 = _bwd_cuda(dy, x, w1, w2, g, pre, has_b1, has_b2)
    else:
        dpre = torch.ops.aten.gelu_backward(dy @ w2, pre, approximate="tanh")
        dx, dw1, dw2 = dpre @ w1, dpre.t() @ x, dy.t() @ g
        db1, db2 = dpre.sum(0) if has_b1 else None, dy.sum(0) if has_b2 else None
    return dx, dw1, dy.new_empty(0) if db1 is None else db1, dw2, dy.new_empty(0) if db2 is None else db2


@_bwd_op.register_fake
def _(dy, x, w1, w2, g, pre, has_b1, has_b2):
    return (torch.empty_like(x), torch.empty_like(w1), dy.new_empty(w1.shape[0] if has_b1 else 0),
            torch.empty_like(w2), dy.new_empty(w2.shape[0] if has_b2 else 0))


def _setup(ctx, inputs, output):
    x, w1, b1, w2, b2 = inputs
    _, g, pre = output
    ctx.save_for_backward(x, w1, w2, g, pre)
    ctx.biases = (b1 is not None, b2 is not None)
    ctx.mark_non_differentiable(g, pre)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dg, _dpre):
    x, w1, w2, g, pre = ctx.saved_tensors
    has_b1, has_b2 = ctx.biases
    dx, dw1, db1, dw2, db2 = _bwd_op(dy.contiguous(), x, w1, w2, g, pre, has_b1, has_b2)
    return dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def fused_dtype(x: Tensor, *weights: Tensor | None) -> torch.dtype | None:
    """The half dtype the fused path would run in for x on CUDA, or None if it does not apply."""
    if not (AVAILABLE and x.is_cuda):
        return None
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    else:
        dtype = x.dtype
        if any(w is not None and w.dtype != dtype for w in weights):
            return None
    return dtype if dtype in _DTYPES else None


def gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
             dtype: torch.dtype | None = None) -> Tensor:
    """``linear(gelu_tanh(linear(x, w1, b1)), w2, b2)`` as one operation; x (..., D) -> (..., D').

    ``dtype``: run in this dtype (the autocast dtype; operands are cast as ``F.linear`` under
    autocast would cast them). On CUDA the GELU runs in cuBLASLt's matmul epilogues; elsewhere in
    torch. Hidden and output widths must be multiples of 8 on CUDA (cuBLASLt's alignment).
    """
    dtype = dtype or x.dtype
    lead = x.shape[:-1]
    cast = [t.to(dtype) if t is not None else None for t in (x.reshape(-1, x.shape[-1]), w1, b1, w2, b2)]
    with torch.autocast(x.device.type, enabled=False):
        y, _, _ = _fwd_op(cast[0].contiguous(), *cast[1:])
    return y.reshape(*lead, w2.shape[0])
