"""gguf_io.py: our header reader agrees with the `gguf` package's GGUFReader, reads v1/v2/v3 files, and
turns every kind of bad file into one LlavaError line (never another exception)."""

from __future__ import annotations

import random
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from llava_jax.errors import LlavaError
from llava_jax.gguf_io import open_gguf

Q = GGMLQuantizationType


def _plain(value):
    """numpy scalars / arrays → Python values, so both readers' outputs compare with ==."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _assert_one_line_error(path, match: str | None = None) -> str:
    with pytest.raises(LlavaError) as info:
        open_gguf(path)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    if match is not None:
        assert match in msg, msg
    return msg


# ---- tiny files -------------------------------------------------------------------------------------

TINY_KV = {  # key → (writer method, value)
    "tiny.u8": ("add_uint8", 7),
    "tiny.i8": ("add_int8", -7),
    "tiny.u16": ("add_uint16", 65535),
    "tiny.i16": ("add_int16", -300),
    "tiny.u32": ("add_uint32", 4_000_000_000),
    "tiny.i32": ("add_int32", -2_000_000_000),
    "tiny.u64": ("add_uint64", 2**63 + 5),
    "tiny.i64": ("add_int64", -(2**62)),
    "tiny.f32": ("add_float32", 0.25),
    "tiny.f64": ("add_float64", 1e-300),
    "tiny.bool": ("add_bool", True),
    "tiny.str": ("add_string", "héllo wörld 🙂"),
    "tiny.empty_str": ("add_empty_string", ""),  # GGUFWriter.add_string skips "", so written by hand below
    "tiny.int_array": ("add_array", [1, 2, 3]),
    "tiny.str_array": ("add_array", ["a", "", "ü"]),
    "tiny.float_array": ("add_array", [0.5, -1.5]),
}


def _tiny_tensors() -> dict[str, tuple[np.ndarray, Q, tuple[int, ...]]]:
    """name → (stored array, type, logical numpy-order shape). The last tensor is 32 bytes, so with
    32-byte alignment the file ends exactly where its data does (no trailing padding)."""
    rng = np.random.default_rng(0)
    q8 = rng.integers(0, 256, size=(3, 2, 34), dtype=np.uint8)  # 3 rows of 2 Q8_0 blocks (64 values)
    q8[..., 1] &= 0x3B  # keep the f16 scales finite
    return {
        "a.weight": (rng.standard_normal((4, 5)).astype(np.float32), Q.F32, (4, 5)),
        "b.weight": (rng.standard_normal((2, 3, 6)).astype(np.float16), Q.F16, (2, 3, 6)),
        "c.weight": (q8.reshape(3, 68), Q.Q8_0, (3, 64)),
        "d.weight": (np.arange(8, dtype=np.float32), Q.F32, (8,)),
    }


def write_tiny_gguf(path, version: int = 3) -> None:
    """A small GGUF with every metadata value type and F32 / F16 / Q8_0 tensors (GGUFWriter writes v3;
    v2 has the identical layout, only the version field differs, so it is patched in place)."""
    w = gguf.GGUFWriter(str(path), "tiny")
    for key, (method, value) in TINY_KV.items():
        if method == "add_empty_string":
            w.add_key_value(key, value, gguf.GGUFValueType.STRING)
        else:
            getattr(w, method)(key, value)
    for name, (arr, qtype, _) in _tiny_tensors().items():
        w.add_tensor(name, arr, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", version))


def write_v1_gguf(path) -> None:
    """GGUF v1 by hand: like v2 but every count (n_tensors, n_kv, string and array lengths, dims) is uint32."""

    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<I", len(b)) + b

    kv = [
        string("general.architecture") + struct.pack("<I", 8) + string("tiny"),
        string("tiny.u32") + struct.pack("<II", 4, 42),
        string("tiny.arr") + struct.pack("<III", 9, 5, 2) + struct.pack("<ii", -1, 3),
    ]
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    info = string("t.weight") + struct.pack("<I", 2) + struct.pack("<II", 3, 2) + struct.pack("<IQ", 0, 0)
    header = b"GGUF" + struct.pack("<III", 1, 1, len(kv)) + b"".join(kv) + info
    header += b"\0" * (-len(header) % 32)
    with open(path, "wb") as f:
        f.write(header + data.tobytes())


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.mark.parametrize("version", [2, 3])
def test_tiny_file_all_value_types(tmp_path, version):
    path = tmp_path / f"tiny_v{version}.gguf"
    write_tiny_gguf(path, version)
    f = open_gguf(path)
    assert f.version == version
    assert f.architecture == "tiny"
    for key, (_, value) in TINY_KV.items():
        got = f.metadata[key]
        if key == "tiny.f32":
            assert got == np.float32(value)
        else:
            assert got == value, key
        assert type(got) is type(value), key
    for name, (arr, qtype, shape) in _tiny_tensors().items():
        view = f.tensors[name]
        assert view.qtype == qtype and view.shape == shape, name
        assert view.raw.dtype == np.uint8
        assert np.array_equal(np.asarray(view.raw).reshape(-1), arr.view(np.uint8).reshape(-1)), name
    c = f.tensors["c.weight"]
    assert c.blocks().shape == (3, 2, 34)


def test_v1_file(tmp_path):
    path = tmp_path / "v1.gguf"
    write_v1_gguf(path)
    f = open_gguf(path)
    assert f.version == 1
    assert f.metadata["general.architecture"] == "tiny"
    assert f.metadata["tiny.u32"] == 42
    assert f.metadata["tiny.arr"] == [-1, 3]
    view = f.tensors["t.weight"]
    assert view.shape == (2, 3) and view.qtype == Q.F32
    assert np.array_equal(np.asarray(view.raw).view(np.float32), np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("version", [2, 3])
def test_tiny_file_matches_gguf_reader(tmp_path, version):
    path = tmp_path / f"tiny_v{version}.gguf"
    write_tiny_gguf(path, version)
    _assert_same_as_reader(path)


def _assert_same_as_reader(path) -> None:
    ours = open_gguf(path)
    ref = GGUFReader(str(path))
    ref_md = {k: _plain(v.contents()) for k, v in ref.fields.items() if k not in ("GGUF.tensor_count", "GGUF.kv_count")}
    assert ours.metadata.keys() == ref_md.keys()
    for key, value in ref_md.items():
        assert ours.metadata[key] == value, key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        view = ours.tensors[t.name]
        assert view.qtype == t.tensor_type, t.name
        assert view.shape == tuple(int(d) for d in reversed(t.shape.tolist())), t.name
        assert view.raw.nbytes == t.n_bytes, t.name
        assert np.array_equal(np.asarray(view.raw).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)), t.name


@pytest.mark.slow
def test_real_file_matches_gguf_reader(smollm2_path):
    """Every metadata value, tensor name, type, shape and byte of the real SmolLM2 file (GGUFReader ~5-8 s)."""
    _assert_same_as_reader(smollm2_path)


def test_real_file_header_is_fast(smollm2_path):
    import time

    t0 = time.perf_counter()
    f = open_gguf(smollm2_path)
    elapsed = time.perf_counter() - t0
    assert f.architecture == "llama" and len(f.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(f.tensors) == 272  # 30 blocks x 9 + token_embd + output_norm (tied output)
    assert elapsed < 5.0, elapsed  # ~0.2 s measured; generous for a shared 2-core machine


# ---- bad files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    _assert_one_line_error(tmp_path / "nope.gguf", "file not found")


def test_directory(tmp_path):
    _assert_one_line_error(tmp_path, "directory")


def test_not_gguf(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("this is certainly not a GGUF file, just some text\n" * 4)
    _assert_one_line_error(path, "not a GGUF file")


@pytest.mark.parametrize("size", [0, 3, 4, 23])
def test_tiny_files(tmp_path, size):
    path = tmp_path / "short.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 16)
    path.write_bytes(path.read_bytes()[:size])
    _assert_one_line_error(path, "not a GGUF file")


@pytest.mark.parametrize("version", [0, 4, 0x03000000])  # 0x03000000: a big-endian v3 file read as little-endian
def test_bad_version(tmp_path, version):
    path = tmp_path / "ver.gguf"
    write_tiny_gguf(path, version)
    _assert_one_line_error(path, "unsupported GGUF version")


def test_truncated_header(tiny_v3, tmp_path):
    data = tiny_v3.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:200])  # inside the metadata
    _assert_one_line_error(path, "truncated")


def test_truncated_tensor_data(tiny_v3, tmp_path):
    data = tiny_v3.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:-1])
    _assert_one_line_error(path, "d.weight")


def test_every_truncation_point(tiny_v3, tmp_path):
    """Cutting the file anywhere before the end of the last tensor's data gives one LlavaError line."""
    data = tiny_v3.read_bytes()
    ref = GGUFReader(str(tiny_v3))
    end = max(t.data_offset + t.n_bytes for t in ref.tensors)
    assert end == len(data)  # the writer added no trailing padding (see _tiny_tensors)
    path = tmp_path / "cut.gguf"
    for cut in range(end):
        path.write_bytes(data[:cut])
        _assert_one_line_error(path)


def test_truncated_real_file(smollm2_path, tmp_path):
    """The real file cut inside its vocabulary (header) and inside its tensor data."""
    data_start = 1_785_664  # where the header ends and token_embd's data begins (GGUFReader's data_offset)
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        head = src.read(data_start + 1000)
    path.write_bytes(head[:1_000_000])
    _assert_one_line_error(path, "truncated")
    path.write_bytes(head)  # header complete, tensor data missing
    _assert_one_line_error(path, "past the end of the file")


def test_corrupted_bytes_never_crash(tiny_v3, tmp_path):
    """Random byte corruptions of the header either still parse or give one LlavaError line; never
    another exception type (which the CLI would print as a traceback)."""
    data = tiny_v3.read_bytes()
    header_end = GGUFReader(str(tiny_v3)).tensors[0].data_offset
    rng = random.Random(0)
    path = tmp_path / "bad.gguf"
    for _ in range(2000):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(4, header_end)
            buf[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        path.write_bytes(bytes(buf))
        try:
            open_gguf(path)
        except LlavaError as e:
            assert "\n" not in str(e)
