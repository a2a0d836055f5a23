"""The compute kernels (``mtor_kernels``): results, sharding, validation and verification.

Sizes stay small (<= 256) so the file runs in seconds on two cores. The CuPy backend is tested
in ``tests/gpu``: on a lent GPU (marker ``gpu``) and against a CuPy stand-in everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from mtor_kernels import (
    KERNELS,
    AttentionKernel,
    BackendUnavailable,
    Kernel,
    KernelError,
    MatmulKernel,
    MlpKernel,
    NumpyBackend,
    ResidentCache,
    check_freivalds_witness,
    compare,
    content_key,
    freivalds,
    get_kernel,
    gpu_available,
    sample_rows,
    select_backend,
)

DTYPES = (np.float32, np.float16)
GPU = gpu_available()

Operands = dict[str, np.ndarray]


def make_operands(name: str, dtype: type, seed: int = 0, rows: int = 37) -> Operands:
    """Random operands of kernel ``name`` with ``rows`` rows (odd, so splits are uneven)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    if name == "matmul":
        return {"a": normal(rows, 48), "b": normal(48, 40)}
    if name == "mlp":
        return {
            "x": normal(rows, 32),
            "w1": normal(32, 64, scale=32**-0.5),
            "b1": normal(64, scale=0.1),
            "w2": normal(64, 24, scale=64**-0.5),
            "b2": normal(24, scale=0.1),
        }
    if name == "attention":
        # seq_q != seq_k and head_dim != head_dim_v, to catch any axis mix-up.
        return {
            "q": normal(rows // 4, 3, 9, 16),
            "k": normal(rows // 4, 3, 11, 16),
            "v": normal(rows // 4, 3, 11, 8),
        }
    raise AssertionError(name)


ALL_CASES = [(name, dtype) for name in ("matmul", "mlp", "attention") for dtype in DTYPES]
CASE_IDS = [f"{name}-{np.dtype(dtype).name}" for name, dtype in ALL_CASES]


def within_bound(kernel: Kernel, operands: Operands, output: np.ndarray) -> float:
    """Largest deviation of every output row from the float64 recomputation, in tolerances."""
    expected = kernel.expected_rows(operands, range(kernel.n_rows(operands)))
    return float(np.max(np.abs(output - expected.values) / expected.tolerance))


# -- registry and results ---------------------------------------------------------------------


def test_registry_names_every_kernel() -> None:
    assert set(KERNELS) == {"matmul", "mlp", "attention"}
    for name, kernel in KERNELS.items():
        assert get_kernel(name) is kernel and kernel.name == name
        assert kernel.split_operand in kernel.split_operands
        assert set(kernel.split_operands) | kernel.resident <= set(kernel.operand_names)
        assert kernel.check in ("freivalds", "sample")
    assert get_kernel("matmul").check == "freivalds"
    assert get_kernel("mlp").check == get_kernel("attention").check == "sample"
    with pytest.raises(KernelError, match="unknown kernel"):
        get_kernel("conv2d")


@pytest.mark.parametrize(("name", "dtype"), ALL_CASES, ids=CASE_IDS)
def test_numpy_run_equals_reference_within_the_bound(name: str, dtype: type) -> None:
    kernel = get_kernel(name)
    operands = make_operands(name, dtype)
    reference = kernel.reference(operands)
    result = kernel.run(operands, NumpyBackend())
    assert result.dtype == reference.dtype == np.float32
    assert result.shape == reference.shape == kernel.output_shape(operands)
    np.testing.assert_array_equal(result, reference)
    # The reference is a float32 computation; the float64 recomputation must agree within the
    # honest-error bound (which is not vacuous either: see the next test). With float16 a
    # rounding flip of an intermediate may use most of the bound: that is what it allows for.
    assert within_bound(kernel, operands, reference) <= 1.0


@pytest.mark.parametrize(("name", "dtype"), ALL_CASES, ids=CASE_IDS)
def test_bound_is_tight_enough_to_see_a_small_error(name: str, dtype: type) -> None:
    """A relative error of 1e-2 (float16) or 1e-4 (float32) on one element exceeds the bound."""
    kernel = get_kernel(name)
    operands = make_operands(name, dtype)
    output = kernel.reference(operands)
    relative = 1e-2 if dtype == np.float16 else 1e-4
    flat = output.reshape(kernel.n_rows(operands), -1)
    row, column = np.unravel_index(np.argmax(np.abs(flat)), flat.shape)
    corrupted = flat.copy()
    corrupted[row, column] *= 1 + relative
    assert within_bound(kernel, operands, corrupted.reshape(output.shape)) > 1.0


@pytest.mark.parametrize(("name", "dtype"), ALL_CASES, ids=CASE_IDS)
def test_output_rows_recompute_single_rows(name: str, dtype: type) -> None:
    kernel = get_kernel(name)
    operands = make_operands(name, dtype)
    reference = kernel.reference(operands)
    rows = [0, 3, kernel.n_rows(operands) - 1]
    recomputed = kernel.output_rows(operands, rows)
    assert recomputed.dtype == np.float32 and recomputed.shape == reference[rows].shape
    expected = kernel.expected_rows(operands, rows)
    assert np.all(np.abs(reference[rows] - expected.values) <= expected.tolerance)
    with pytest.raises(KernelError, match="out of range"):
        kernel.output_rows(operands, [kernel.n_rows(operands)])


# -- sharding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dtype"), ALL_CASES, ids=CASE_IDS)
def test_sharded_run_equals_unsharded(name: str, dtype: type) -> None:
    kernel = get_kernel(name)
    operands = make_operands(name, dtype)
    whole = kernel.reference(operands)
    rows = kernel.n_rows(operands)
    backend = NumpyBackend()
    for n_shards in (1, 2, 3, 4, rows - 1, rows, rows + 5):
        ranges = kernel.shard_rows(operands, n_shards)
        assert len(ranges) == min(n_shards, rows)
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(stop > start for start, stop in ranges)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1
        parts = []
        for start, stop in ranges:
            shard = kernel.shard_operands(operands, start, stop)
            for operand_name, array in shard.items():
                if operand_name in kernel.resident:
                    assert array is operands[operand_name]
            parts.append(kernel.run(shard, backend))
        assembled = kernel.assemble(parts)
        assert assembled.shape == whole.shape
        # BLAS may block a 1-row product differently from the whole: equal within rounding.
        ok, error = compare(whole, assembled, dtype)
        assert ok, (n_shards, error)
        assert within_bound(kernel, operands, assembled) <= 1.0


def test_shard_arguments_are_checked() -> None:
    kernel = get_kernel("matmul")
    operands = make_operands("matmul", np.float32)
    with pytest.raises(KernelError):
        kernel.shard_rows(operands, 0)
    for start, stop in ((0, 0), (-1, 3), (5, 4), (0, 38)):
        with pytest.raises(KernelError, match="bad row range"):
            kernel.shard_operands(operands, start, stop)
    with pytest.raises(KernelError):
        kernel.assemble([])
    assert kernel.shard_rows(operands, 5) == [(0, 8), (8, 16), (16, 23), (23, 30), (30, 37)]


# -- independent implementations check the reference -------------------------------------------


def naive_gelu(h: float) -> float:
    return 0.5 * h * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))


def naive_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m, k = a.shape
    n = b.shape[1]
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            out[i, j] = math.fsum(float(a[i, t]) * float(b[t, j]) for t in range(k))
    return out


def naive_mlp(operands: Operands) -> np.ndarray:
    x, w1, b1, w2, b2 = (operands[n] for n in ("x", "w1", "b1", "w2", "b2"))
    hidden = naive_matmul(x, w1) + b1.astype(np.float64)
    activation = np.vectorize(naive_gelu)(hidden)
    if x.dtype == np.float16:  # the kernel's definition rounds the activation to float16
        activation = np.array([[float(np.float16(v)) for v in row] for row in activation])
    return naive_matmul(activation, w2) + b2.astype(np.float64)


def naive_attention(operands: Operands) -> np.ndarray:
    q, k, v = operands["q"], operands["k"], operands["v"]
    batch, heads, seq_q, head_dim = q.shape
    seq_k, head_dim_v = v.shape[2:]
    out = np.zeros((batch, heads, seq_q, head_dim_v))
    for b in range(batch):
        for h in range(heads):
            for i in range(seq_q):
                scores = [
                    math.fsum(float(q[b, h, i, d]) * float(k[b, h, j, d]) for d in range(head_dim))
                    / math.sqrt(head_dim)
                    for j in range(seq_k)
                ]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = math.fsum(weights)
                probabilities = [w / total for w in weights]
                if q.dtype == np.float16:
                    probabilities = [float(np.float16(p)) for p in probabilities]
                for d in range(head_dim_v):
                    out[b, h, i, d] = math.fsum(
                        probabilities[j] * float(v[b, h, j, d]) for j in range(seq_k)
                    )
    return out


NAIVE: dict[str, Callable[[Operands], np.ndarray]] = {
    "matmul": lambda ops: naive_matmul(ops["a"], ops["b"]),
    "mlp": naive_mlp,
    "attention": naive_attention,
}


@pytest.mark.parametrize(("name", "dtype"), ALL_CASES, ids=CASE_IDS)
def test_naive_implementation_agrees_with_reference(name: str, dtype: type) -> None:
    kernel = get_kernel(name)
    operands = make_operands(name, dtype, seed=3, rows=9)
    naive = NAIVE[name](operands)
    expected = kernel.expected_rows(operands, range(kernel.n_rows(operands)))
    # The float64 recomputation and the naive loops implement the same definition.
    np.testing.assert_allclose(expected.values, naive, rtol=1e-9, atol=1e-12)
    # The float32 reference is within the honest-error bound of it.
    assert np.all(np.abs(kernel.reference(operands) - naive) <= expected.tolerance)


def test_tanh_gelu_is_close_to_the_exact_gelu() -> None:
    for h in np.linspace(-6, 6, 241):
        exact = 0.5 * h * (1.0 + math.erf(h / math.sqrt(2.0)))
        assert abs(naive_gelu(h) - exact) < 1e-3


def test_softmax_is_stable_for_large_scores() -> None:
    kernel = get_kernel("attention")
    operands = make_operands("attention", np.float32, rows=8)
    operands["q"] = operands["q"] * np.float32(300.0)  # scores ~ 1e3: exp would overflow
    out = kernel.reference(operands)
    assert np.all(np.isfinite(out))
    assert within_bound(kernel, operands, out) <= 1.0


# -- flops and validation ----------------------------------------------------------------------


def test_flops_of_known_shapes() -> None:
    f32 = np.float32
    assert MatmulKernel().flops({"a": np.zeros((3, 5), f32), "b": np.zeros((5, 7), f32)}) == 210
    mlp_operands = {
        "x": np.zeros((4, 8), f32),
        "w1": np.zeros((8, 16), f32),
        "b1": np.zeros(16, f32),
        "w2": np.zeros((16, 2), f32),
        "b2": np.zeros(2, f32),
    }
    assert MlpKernel().flops(mlp_operands) == 2 * 4 * (8 * 16 + 16 * 2)
    attention_operands = {
        "q": np.zeros((2, 3, 5, 4), f32),
        "k": np.zeros((2, 3, 6, 4), f32),
        "v": np.zeros((2, 3, 6, 7), f32),
    }
    assert AttentionKernel().flops(attention_operands) == 2 * 2 * 3 * 5 * 6 * (4 + 7)


def bad_operand_cases() -> list[tuple[str, Callable[[Operands], Operands], str]]:
    def with_(name: str, value: object) -> Callable[[Operands], Operands]:
        return lambda ops: {**ops, name: value}

    def without(name: str) -> Callable[[Operands], Operands]:
        return lambda ops: {k: v for k, v in ops.items() if k != name}

    f32 = np.float32
    return [
        ("matmul", without("b"), "missing: b"),
        ("matmul", with_("c", np.zeros((2, 2), f32)), "unexpected: c"),
        ("matmul", with_("a", [[1.0]]), "not a numpy array"),
        ("matmul", with_("a", np.zeros((37, 48), np.float64)), "dtype float64"),
        ("matmul", with_("a", np.zeros((37, 48), np.int32)), "dtype int32"),
        ("matmul", with_("a", np.zeros((37, 48), np.float16)), "mix dtypes"),
        ("matmul", with_("a", np.zeros((37, 47), f32)), "shape mismatch"),
        ("matmul", with_("a", np.zeros((37, 48, 1), f32)), "dimensions"),
        ("matmul", with_("a", np.zeros((0, 48), f32)), "empty"),
        ("mlp", with_("b1", np.zeros(63, f32)), "shape mismatch"),
        ("mlp", with_("w2", np.zeros((63, 24), f32)), "shape mismatch"),
        ("mlp", with_("b2", np.zeros((24, 1), f32)), "dimensions"),
        ("attention", with_("k", np.zeros((9, 3, 11, 15), f32)), "shape mismatch"),
        ("attention", with_("v", np.zeros((9, 3, 10, 8), f32)), "shape mismatch"),
        ("attention", with_("q", np.zeros((9, 3, 16), f32)), "dimensions"),
    ]


@pytest.mark.parametrize(("name", "change", "reason"), bad_operand_cases())
def test_check_operands_rejects(
    name: str, change: Callable[[Operands], Operands], reason: str
) -> None:
    kernel = get_kernel(name)
    with pytest.raises(KernelError, match=reason) as raised:
        kernel.check_operands(change(make_operands(name, np.float32)))
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_check_operands_enforces_size_limits() -> None:
    operands = make_operands("matmul", np.float32)  # a 37x48 (1776), b 48x40 (1920)
    MatmulKernel(max_elements=1920).check_operands(operands)
    with pytest.raises(KernelError, match="operand 'b' has 1920 elements, above the limit"):
        MatmulKernel(max_elements=1919).check_operands(operands)
    outer = {"a": np.ones((60, 2), np.float32), "b": np.ones((2, 60), np.float32)}
    with pytest.raises(KernelError, match="output has 3600 elements"):
        MatmulKernel(max_elements=3599).check_operands(outer)
    long_sequence = {name: np.ones((1, 1, 64, 2), np.float32) for name in ("q", "k", "v")}
    AttentionKernel(max_elements=64 * 64).check_operands(long_sequence)
    with pytest.raises(KernelError, match="attention scores has 4096 elements"):
        AttentionKernel(max_elements=64 * 64 - 1).check_operands(long_sequence)
    assert get_kernel("mlp").max_elements == 2**28


def test_non_finite_values_are_allowed_and_propagate() -> None:
    operands = make_operands("matmul", np.float32)
    operands["a"][2, 5] = np.nan
    out = get_kernel("matmul").run(operands, NumpyBackend())
    assert np.all(np.isnan(out[2])) and np.all(np.isfinite(np.delete(out, 2, axis=0)))


# -- Freivalds ---------------------------------------------------------------------------------


def product_by_blocks(a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """float32 product summing k-blocks separately, last block first (another order)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    out = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for start in reversed(range(0, a.shape[1], block)):
        out += a32[:, start : start + block] @ b32[start : start + block]
    return out


def product_sequential(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 product accumulating one term at a time with one rounding per step (like FMA):
    the order with the largest honest error."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    out = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for t in range(a.shape[1]):
        out = (out + np.outer(a64[:, t], b64[t])).astype(np.float32)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_freivalds_accepts_honest_products(dtype: type) -> None:
    for seed in range(40):
        rng = np.random.default_rng(seed)
        a = rng.standard_normal((64, 256)).astype(dtype)
        b = rng.standard_normal((256, 48)).astype(dtype)
        for c in (
            MatmulKernel().reference({"a": a, "b": b}),
            product_by_blocks(a, b, block=17 + seed),
        ):
            result = freivalds(a, b, c, rng=rng)
            assert result.ok and result.witness is None, (seed, result.max_error)
            assert result.max_error < 0.2


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_freivalds_accepts_large_k_in_the_worst_honest_order(dtype: type) -> None:
    """k = 4096, summed sequentially: constant rank-one data makes every rounding go the same
    way (error ~ u k |C|), uniform data has a positive drift, normal data is the common case."""
    rng = np.random.default_rng(7)
    k = 4096
    datasets = {
        "rank-one constant": (
            np.outer(rng.uniform(0.05, 1, 8), np.ones(k)),
            np.outer(np.ones(k), rng.uniform(0.05, 1, 8)),
        ),
        "uniform": (rng.random((8, k)), rng.random((k, 8))),
        "normal": (rng.standard_normal((8, k)), rng.standard_normal((k, 8))),
    }
    for label, (a, b) in datasets.items():
        a, b = a.astype(dtype), b.astype(dtype)
        for c in (product_sequential(a, b), product_by_blocks(a, b, 100)):
            result = freivalds(a, b, c, rng=rng)
            assert result.ok and result.max_error < 0.5, (label, result.max_error)


def corruptions(c: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    one_element = c.copy()
    one_element[rng.integers(c.shape[0]), rng.integers(c.shape[1])] += 1.0
    row_swapped = c.copy()
    i, j = rng.choice(c.shape[0], size=2, replace=False)
    row_swapped[[i, j]] = row_swapped[[j, i]]
    return {"one element +1": one_element, "rows swapped": row_swapped, "zero": np.zeros_like(c)}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_freivalds_rejects_wrong_products_every_time(dtype: type) -> None:
    """Entries of C are ~ sqrt(k) = 16; each corruption is caught for every seed, and the
    witness re-checks (and does not convict the honest product)."""
    for seed in range(30):
        rng = np.random.default_rng(1000 + seed)
        a = rng.standard_normal((96, 256)).astype(dtype)
        b = rng.standard_normal((256, 80)).astype(dtype)
        honest = MatmulKernel().reference({"a": a, "b": b})
        for label, c in corruptions(honest, rng).items():
            result = freivalds(a, b, c, rng=rng)
            assert not result.ok and result.max_error > 1.0, (seed, label)
            assert result.witness is not None and result.witness.shape == (80,)
            assert set(np.unique(result.witness)) <= {-1, 1}
            assert check_freivalds_witness(a, b, c, result.witness), (seed, label)
            assert not check_freivalds_witness(a, b, honest, result.witness)


def test_freivalds_single_element_is_found_in_one_round() -> None:
    """|r_j| = 1, so one wrong element moves its row's residual by exactly the error."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((32, 128)).astype(np.float32)
    b = rng.standard_normal((128, 32)).astype(np.float32)
    c = MatmulKernel().reference({"a": a, "b": b})
    c[7, 9] -= 0.5
    for seed in range(20):
        result = freivalds(a, b, c, rounds=1, rng=np.random.default_rng(seed))
        assert not result.ok and result.row == 7


def test_freivalds_witness_must_be_a_sign_vector() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal((32, 8)).astype(np.float32)
    c = np.zeros((16, 8), np.float32)
    assert check_freivalds_witness(a, b, c, np.ones(8, np.int8))
    assert not check_freivalds_witness(a, b, c, np.ones(7, np.int8))
    assert not check_freivalds_witness(a, b, c, np.full(8, 2, np.int8))
    assert not check_freivalds_witness(a, b, c, np.zeros(8, np.int8))
    with pytest.raises(KernelError):
        freivalds(a, b, c[:, :7], rng=rng)


def test_freivalds_handles_non_finite_inputs() -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal((32, 8)).astype(np.float32)
    a[3, 4] = np.nan
    c = MatmulKernel().reference({"a": a, "b": b})
    assert freivalds(a, b, c, rng=rng).ok
    c_bad = c.copy()
    c_bad[3] = 0.0  # claims a finite row where the true row is NaN
    assert not freivalds(a, b, c_bad, rng=rng).ok


# -- sampling and comparison -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dtype"), ALL_CASES, ids=CASE_IDS)
def test_sample_rows_catches_a_corrupted_row_when_sampled(name: str, dtype: type) -> None:
    kernel = get_kernel(name)
    operands = make_operands(name, dtype)
    output = kernel.reference(operands)
    rows = kernel.n_rows(operands)
    assert sample_rows(kernel, operands, output, samples=rows, rng=np.random.default_rng(0)).ok
    bad_row = rows // 2
    corrupted = output.copy()
    corrupted[bad_row] = corrupted[bad_row] * np.float32(1.05) + np.float32(0.01)
    for seed in range(25):
        result = sample_rows(
            kernel, operands, corrupted, samples=3, rng=np.random.default_rng(seed)
        )
        assert len(result.rows) == 3 and len(set(result.rows.tolist())) == 3
        assert result.ok == (bad_row not in result.rows), (seed, result)
        if not result.ok:
            assert result.bad_rows.tolist() == [bad_row] and result.max_error > 1.0


@pytest.mark.parametrize(("name", "dtype"), ALL_CASES, ids=CASE_IDS)
def test_sample_rows_always_catches_a_wrong_output(name: str, dtype: type) -> None:
    kernel = get_kernel(name)
    operands = make_operands(name, dtype)
    output = kernel.reference(operands)
    wrong_outputs = {
        "zeros": np.zeros_like(output),
        "noise": np.random.default_rng(9).standard_normal(output.shape).astype(np.float32),
        "other inputs": kernel.reference(make_operands(name, dtype, seed=1)),
    }
    for label, wrong in wrong_outputs.items():
        for seed in range(10):
            result = sample_rows(
                kernel, operands, wrong, samples=1, rng=np.random.default_rng(seed)
            )
            assert not result.ok, (label, seed)
    wrong_shape = sample_rows(
        kernel, operands, output[:-1], samples=1, rng=np.random.default_rng(0)
    )
    assert not wrong_shape.ok and wrong_shape.max_error == math.inf


@pytest.mark.parametrize(("name", "dtype"), ALL_CASES, ids=CASE_IDS)
def test_compare_accepts_honest_outputs_and_rejects_wrong_ones(name: str, dtype: type) -> None:
    kernel = get_kernel(name)
    operands = make_operands(name, dtype)
    output = kernel.reference(operands)
    exact = kernel.expected_rows(operands, range(kernel.n_rows(operands))).values
    assert compare(output, output, dtype) == (True, 0.0)
    ok, error = compare(exact, output, dtype)
    assert ok and error < 0.2, error
    corrupted = output.copy()
    corrupted.reshape(-1)[5] += np.float32(0.05) * np.abs(output).max()
    assert not compare(output, corrupted, dtype)[0]
    assert compare(output, output[:-1], dtype) == (False, math.inf)


def test_compare_non_finite_values() -> None:
    x = np.array([1.0, np.nan, np.inf, -np.inf], np.float32)
    assert compare(x, x.copy(), np.float32)[0]
    assert not compare(x, np.array([1.0, 0.0, np.inf, -np.inf], np.float32), np.float32)[0]
    assert not compare(x, np.array([1.0, np.nan, -np.inf, -np.inf], np.float32), np.float32)[0]
    with pytest.raises(KernelError):
        compare(x, x, np.int32)


# -- backends ----------------------------------------------------------------------------------


def test_resident_cache_is_lru_by_bytes() -> None:
    cache = ResidentCache(max_bytes=100)
    assert cache.insert("a", "A", 40) and cache.insert("b", "B", 40)
    assert cache.lookup("a") == "A"  # "a" becomes most recently used
    assert cache.insert("c", "C", 40)  # evicts "b", the least recently used
    assert "b" not in cache and cache.lookup("b") is None
    assert cache.lookup("c") == "C" and "a" in cache
    assert not cache.insert("huge", "H", 101) and "huge" not in cache
    cache.insert("a", "A2", 10)  # replacing an entry re-counts its bytes
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions) == (2, 50, 1)
    assert (stats.hits, stats.misses) == (2, 1)
    cache.discard("a")
    cache.clear()
    assert cache.stats().bytes == 0
    with pytest.raises(ValueError):
        ResidentCache(-1)


def test_content_key_names_content_exactly() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert content_key(a) == content_key(a.copy())
    assert content_key(a) != content_key(a.reshape(4, 3))
    assert content_key(a) != content_key(a.astype(np.float16))
    changed = a.copy()
    changed[2, 3] += 1
    assert content_key(a) != content_key(changed)


def test_numpy_backend() -> None:
    backend = select_backend("numpy")
    assert isinstance(backend, NumpyBackend) and backend.name == "numpy"
    a = np.ones((3, 4), np.float16)
    assert backend.put(a, key="k") is a  # host arrays are not copied
    assert backend.cache.stats().entries == 0
    product = backend.matmul(a, np.ones((4, 2), np.float16))
    assert product.dtype == np.float32 and np.all(product == 4)
    transposed = backend.matmul(a, np.ones((2, 4), np.float16), transpose_b=True, scale=0.5)
    assert np.all(transposed == 2)
    with pytest.raises(TypeError):
        backend.matmul(a, np.ones((4, 2), np.float32))
    assert backend.empty_host((2, 3), np.float32).shape == (2, 3)
    assert select_backend("none").name == "numpy"  # the --gpu none spelling
    with pytest.raises(ValueError):
        select_backend("tpu")


@pytest.mark.skipif(GPU, reason="checks the behaviour without a GPU")
def test_without_gpu_auto_selects_numpy_and_cupy_is_unavailable() -> None:
    assert select_backend("auto").name == "numpy"
    with pytest.raises(BackendUnavailable):
        select_backend("cupy")


# The CuPy backend's tests are in tests/gpu: on a GPU (marker ``gpu``) and on a stand-in.
