"""Native XLA:CPU kernels for the decode step, registered as XLA FFI custom calls (`jax.ffi`).

Two kernels (`kernels/decode_kernels.cc`), used by one-token decode steps on one CPU device in f32:
- `decode_attention`: XLA:CPU runs one-token attention as small batched dots and a softmax over the
  whole static window at a fraction of memory speed (SmolLM2, column ~600: ~5 ms of a ~32 ms token);
  the kernel reads only the valid columns, each key and value column once for all the query heads that
  share it. The cache may be f32 or f16 (`-ctk/-ctv f16`: half the bytes a step reads, converted exactly).
- `gemv`: the layers' matrix-vector products. A decode step reads every weight once and is bound by
  memory speed; each thread streams its rows sequentially (the pattern the hardware prefetcher follows
  best), in 8 pieces per thread taken from one counter so a slowed thread does less. On the 2-core VM
  a chain of SmolLM2's 121 products streams ~24 GB/s this way vs ~21 GB/s with XLA's dots.
- `qgemv`: the same products over weights kept in GGUF's block formats (`qtensor.QTensor`): each
  block is unpacked and scaled into an L1-resident buffer and multiplied into every input row, so a
  decode step reads the packed bytes (Q4_K: 4.5 bits a weight) instead of f32.
- `dequantize`: the same unpacking into an f32 `[N, K]` array at memory speed, for the products too
  large for a gemv (prefill, teacher forcing, the vision tower): XLA's dot then reads it (XLA's own
  elementwise dequantization runs ~0.2 G weights/s on the 2-core VM).
All run on XLA's intra-op threads. The pure-XLA paths (`text.attention`, `text.Linear`'s einsum) stay
the reference; tests hold the kernels to them within f32 rounding.

The C++ source ships with the package and is compiled on first use with the system C++ compiler
(`$CXX`, else `c++`) against the FFI headers jaxlib ships (`jax.ffi.include_dir()`), into
`<cache>/kernels/` under a name that hashes the source, flags, compiler, jaxlib version and CPU, so a
changed input rebuilds and concurrent processes never see a half-written library. When the build
fails (no compiler, unsupported platform) `kernels_available()` is False, the decoder keeps the XLA
paths, and `kernel_status()` says why; set `LLAVA_JAX_CPU_KERNELS=0` to never build or use them.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from gguf import GGMLQuantizationType as Q

KERNELS = Path(__file__).parent / "kernels"
SOURCES = (KERNELS / "decode_kernels.cc", KERNELS / "prefill_matmul.cc")  # compiled into one library
HEADERS = (KERNELS / "common.h", KERNELS / "block_formats.h", KERNELS / "int8_products.h")
TARGETS = {"llava_jax_decode_attention": "LlavaDecodeAttention",
           "llava_jax_decode_attention_f16": "LlavaDecodeAttentionF16", "llava_jax_gemv": "LlavaGemv",
           "llava_jax_qgemv": "LlavaQGemv", "llava_jax_dequantize": "LlavaDequantize",
           "llava_jax_qmatmul": "LlavaQMatmul"}  # name: symbol
ATTENTION, ATTENTION_F16, GEMV, QGEMV, DEQUANTIZE, QMATMUL = TARGETS
ATTENTION_KV_DTYPES = {jnp.dtype(jnp.float32): ATTENTION, jnp.dtype(jnp.float16): ATTENTION_F16}  # cache dtype: target
GEMV_MAX_ROWS = 8  # more input rows than this: XLA's dot (a skinny matrix product, not a gemv)
QGEMV_MAX_ROWS = 16  # the quantized product's limit (kQGemvMaxRows in the source)
# Block formats the quantized product reads directly (ggml type → values per unit the kernel reads);
# F16 / BF16 are read 32 values at a time, so their rows must hold a multiple of 32.
QGEMV_UNITS = {Q.F16: 32, Q.BF16: 32, Q.Q4_0: 32, Q.Q4_1: 32, Q.Q5_0: 32, Q.Q5_1: 32, Q.Q8_0: 32,
               Q.Q2_K: 256, Q.Q3_K: 256, Q.Q4_K: 256, Q.Q5_K: 256, Q.Q6_K: 256}
# No -ffast-math: `#pragma omp simd` (-fopenmp-simd) is what lets the reductions vectorize.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")
ENV_SWITCH = "LLAVA_JAX_CPU_KERNELS"
# Types whose decode product can run on integer dot products (kernels/int8_products.h: AVX-512 VNNI),
# x rounded to 21 bits relative to the largest of each 16 values; LLAVA_JAX_INT8=0 keeps the f32 path.
INT8_TYPES = frozenset({Q.Q4_K, Q.Q6_K})
INT8_SWITCH = "LLAVA_JAX_INT8"

_status: dict[str, str] = {}


def kernel_status() -> str:
    """Why the decode kernels are or are not in use (after `kernels_available()`)."""
    return _status.get("kernels", "not built yet")


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _library_path(compiler: str) -> Path:
    from llava_jax.defaults import cache_dir

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(FLAGS).encode(), repr(version).encode(),
                 jaxlib.__version__.encode(), _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / "kernels" / f"decode_kernels-{key.hexdigest()[:16]}.so"


def compile_command(compiler: str, out: Path, flags: tuple[str, ...] = FLAGS) -> list[str]:
    """The command that compiles `SOURCES` into the shared library `out` (tests vary `flags`' -march)."""
    return [compiler, *flags, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(out)]


def build_library() -> Path:
    """Compile the kernel (once per source / compiler / CPU) and return the shared library's path.
    Raises RuntimeError with the compiler's last words when it cannot."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    lib = _library_path(compiler)
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        partial = Path(tmp) / lib.name
        proc = subprocess.run(compile_command(compiler, partial), capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"compiling {' '.join(f.name for f in SOURCES)} failed: {last}")
        partial.replace(lib)  # atomic: another process sees the whole library or none
    return lib


@cache
def kernels_available() -> bool:
    """Whether the decode kernels are built and registered (see `kernel_status()` when not). Builds and
    registers at most once per process."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _status["kernels"] = f"disabled by {ENV_SWITCH}=0"
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build_library()))
        _status["amx"] = "in use" if lib.LlavaAmxAvailable() else "unavailable (no AMX on this CPU, or the OS refused it)"
        _status["int8"] = "in use" if lib.LlavaInt8Available() else "unavailable (no AVX-512 VNNI on this CPU)"
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        _status["kernels"] = f"unavailable: {e}"
        return False
    _status["kernels"] = "in use"
    return True


def _require():
    if not kernels_available():
        raise RuntimeError(f"decode kernels {kernel_status()}")


def decode_attention(q: jax.Array, kt: jax.Array, v: jax.Array, kv_start: jax.Array, column: jax.Array) -> jax.Array:
    """One query token per row against a per-layer KV buffer (CPU only).

    q f32 [B, 1, H, Dh]; kt [*lead, Dh, S]; v [*lead, S, Dh], both f32 or both f16 (a `-ctk/-ctv f16`
    cache: the kernel reads the f16 values as f32, exactly), lead = (B, Hkv) without its size-1
    dims (`text.head_lead`); kv_start int32 [B]; column int32 [] (the new token's column, already
    written) → f32 [B, 1, H * Dh], query head h reading KV head h // (H / Hkv), as `text.attention`.
    """
    _require()
    b, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"decode attention takes one query token per row, got {t}")
    n = kt.size // (kt.shape[-1] * d)  # B * Hkv
    qh = q.reshape(n, h * b // n, d)  # [B * Hkv, G, Dh]: heads are kv-major within a row
    if kt.dtype != v.dtype or kt.dtype not in ATTENTION_KV_DTYPES:
        raise ValueError(f"decode attention takes an f32 or f16 cache, got keys {kt.dtype}, values {v.dtype}")
    out = jax.ffi.ffi_call(ATTENTION_KV_DTYPES[kt.dtype], jax.ShapeDtypeStruct(qh.shape, jnp.float32))(
        qh, kt, v, kv_start.astype(jnp.int32), jnp.asarray(column, jnp.int32))
    return out.reshape(b, t, h * d)


def gemv_applies(x_shape: tuple[int, ...], x_dtype, w_dtype) -> bool:
    """Whether `gemv` takes x @ w.T for these operands: f32 both, at most GEMV_MAX_ROWS input rows."""
    rows = math.prod(x_shape[:-1])
    return 0 < rows <= GEMV_MAX_ROWS and jnp.dtype(x_dtype) == jnp.dtype(w_dtype) == jnp.float32


def gemv(x: jax.Array, w: jax.Array) -> jax.Array:
    """x f32 [..., K] (at most GEMV_MAX_ROWS rows in all), w f32 [N, K] (`[out, in]`) → f32 [..., N] = x @ w.T."""
    _require()
    if not gemv_applies(x.shape, x.dtype, w.dtype) or w.ndim != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"gemv takes f32 x [..., K] with <= {GEMV_MAX_ROWS} rows and w [N, K]; "
                         f"got {x.dtype}{list(x.shape)} and {w.dtype}{list(w.shape)}")
    lead = x.shape[:-1]
    y = jax.ffi.ffi_call(GEMV, jax.ShapeDtypeStruct((math.prod(lead), w.shape[0]), jnp.float32))(
        x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*lead, w.shape[0])


def qgemv_applies(x_shape: tuple[int, ...], x_dtype, qtype, k: int) -> bool:
    """Whether `qgemv` takes x @ dequantize(w).T: f32 x with at most QGEMV_MAX_ROWS rows, a type it reads,
    rows of `k` values in whole units."""
    rows = math.prod(x_shape[:-1])
    return 0 < rows <= QGEMV_MAX_ROWS and jnp.dtype(x_dtype) == jnp.float32 and dequantize_applies(qtype, k)


def int8_available() -> bool:
    """Whether `qgemv` runs INT8_TYPES on integer dot products: the kernels are built with AVX-512 VNNI
    and LLAVA_JAX_INT8 is not 0."""
    return kernels_available() and _status.get("int8") == "in use" and os.environ.get(INT8_SWITCH, "1") != "0"


def qgemv(x: jax.Array, blocks: jax.Array, qtype, int8: bool | None = None) -> jax.Array:
    """x f32 [..., K] (at most QGEMV_MAX_ROWS rows), blocks uint8 [N, K / block_size, type_size] (a GGUF
    matrix's rows in its own block format) → f32 [..., N] = x @ dequantize(blocks).T.

    int8 (default `int8_available()`): INT8_TYPES on integer dot products, x rounded to 21 bits relative to
    the largest |x| of each group of 16 values (kernels/int8_products.h); otherwise f32 multiply-adds, only
    the order of the f32 sums differing from XLA's dot. Ignored for other types."""
    _require()
    k = x.shape[-1]
    if blocks.ndim != 3 or blocks.dtype != jnp.uint8 or not qgemv_applies(x.shape, x.dtype, qtype, k):
        raise ValueError(f"qgemv takes f32 x [..., K] with <= {QGEMV_MAX_ROWS} rows and uint8 blocks [N, nb, bytes] "
                         f"of a type in QGEMV_UNITS; got {x.dtype}{list(x.shape)}, {blocks.dtype}{list(blocks.shape)} "
                         f"{getattr(qtype, 'name', qtype)}")
    integer = int8_available() if int8 is None else int8
    return _block_product(QGEMV, x, blocks, qtype, int8=np.int32(bool(integer) and qtype in INT8_TYPES))


def _block_product(target: str, x: jax.Array, blocks: jax.Array, qtype, **attrs) -> jax.Array:
    """The custom call `target` on x [..., K] and a matrix's blocks [N, ...] → f32 [..., N]."""
    n, k, lead = blocks.shape[0], x.shape[-1], x.shape[:-1]
    y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((math.prod(lead), n), jnp.float32))(
        x.reshape(-1, k), blocks.reshape(n, -1), qtype=np.int32(int(qtype)), **attrs)
    return y.reshape(*lead, n)


def dequantize_applies(qtype, k: int) -> bool:
    """Whether `dequantize` reads this type for rows of `k` values."""
    unit = QGEMV_UNITS.get(qtype)
    return unit is not None and k % unit == 0


def dequantize(blocks: jax.Array, qtype, k: int) -> jax.Array:
    """uint8 blocks [N, K / block_size, type_size] (or [N, row_bytes]) → f32 [N, K], bit-exact with
    `quants.dequantize`."""
    _require()
    n = blocks.shape[0]
    if blocks.dtype != jnp.uint8 or not dequantize_applies(qtype, k):
        raise ValueError(f"dequantize takes uint8 blocks of a type in QGEMV_UNITS with rows of whole units; got "
                         f"{blocks.dtype}{list(blocks.shape)} {getattr(qtype, 'name', qtype)} k={k}")
    return jax.ffi.ffi_call(DEQUANTIZE, jax.ShapeDtypeStruct((n, k), jnp.float32))(
        blocks.reshape(n, -1), qtype=np.int32(int(qtype)))


AMX_SWITCH = "LLAVA_JAX_AMX"


def amx_available() -> bool:
    """Whether `qmatmul` runs here: the kernels are built with AMX, the OS granted its tile state, and
    LLAVA_JAX_AMX is not 0 (then prompts dequantize each weight for XLA's f32 dot, as without AMX)."""
    return kernels_available() and _status.get("amx") == "in use" and os.environ.get(AMX_SWITCH, "1") != "0"


QMATMUL_MIN_ROWS = QGEMV_MAX_ROWS + 1  # fewer rows: `qgemv`


def qmatmul_applies(x_shape: tuple[int, ...], x_dtype, qtype, k: int) -> bool:
    """Whether `qmatmul` takes x @ dequantize(w).T: f32 x with more than QGEMV_MAX_ROWS rows, a type the
    kernels read, rows of whole units, and AMX here."""
    rows = math.prod(x_shape[:-1])
    return (rows >= QMATMUL_MIN_ROWS and jnp.dtype(x_dtype) == jnp.float32 and dequantize_applies(qtype, k)
            and amx_available())


def qmatmul(x: jax.Array, blocks: jax.Array, qtype) -> jax.Array:
    """x f32 [..., K], blocks uint8 [N, K / block_size, type_size] → f32 [..., N] = x @ dequantize(blocks).T on
    AMX tiles (`kernels/prefill_matmul.cc`): x and the weights split into three bf16 parts each, the six
    products above 2^-24 of the whole summed in f32, so the result is the f32 product within f32 rounding."""
    if not amx_available():
        raise RuntimeError(f"qmatmul needs AMX: {_status.get('amx', kernel_status())}")
    if blocks.dtype != jnp.uint8 or not qmatmul_applies(x.shape, x.dtype, qtype, x.shape[-1]):
        raise ValueError(f"qmatmul takes f32 x [..., K] with >= {QMATMUL_MIN_ROWS} rows and uint8 blocks of a type in "
                         f"QGEMV_UNITS; got {x.dtype}{list(x.shape)}, {blocks.dtype}{list(blocks.shape)} "
                         f"{getattr(qtype, 'name', qtype)}")
    return _block_product(QMATMUL, x, blocks, qtype)
