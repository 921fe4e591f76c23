"""Pointwise pieces shared by the forward and backward kernels.

Dimension legend: BLOCK_B rows of the batch, BLOCK_H hidden units; a gate tile is [BLOCK_B, 4*BLOCK_H]
in the *unit-interleaved* column order used by every kernel: column 4*j + k holds gate k (i=0, f=1,
g=2, o=3) of hidden unit j. That order lets one program own all four gates of its units with a single
contiguous block of W_hh rows, so the four gate matmuls are one ``tl.dot``.
"""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    # exp(-|x|) lies in (0, 1], so neither branch can overflow for any finite or infinite x.
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def tanh(x):
    # libdevice.tanh does not run in the interpreter; tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|)
    # is finite for every input and keeps the sign exact.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def gate_activations(pre, BLOCK_G: tl.constexpr):
    """σ on the i, f, o columns and tanh on the g columns of an interleaved [*, BLOCK_G] tile."""
    col = tl.arange(0, BLOCK_G)
    is_g = (col % 4 == 2)[None, :]
    # tanh(x) = 2σ(2x) − 1: one exponential per element for all four gates.
    scale = tl.where(is_g, 2.0, 1.0)
    return sigmoid(pre * scale) * scale - (scale - 1.0)


@triton.jit
def split_gates(tile, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_B, 4*BLOCK_H] interleaved → four [BLOCK_B, BLOCK_H] tiles (i, f, g, o)."""
    t = tl.reshape(tile, (BLOCK_B, BLOCK_H, 2, 2))
    ig, fo = tl.split(t)  # last axis: k % 2
    i, g = tl.split(ig)  # then k // 2
    f, o = tl.split(fo)
    return i, f, g, o


@triton.jit
def join_gates(i, f, g, o, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Inverse of :func:`split_gates`."""
    t = tl.join(tl.join(i, g), tl.join(f, o))
    return tl.reshape(t, (BLOCK_B, 4 * BLOCK_H))


@triton.jit
def cell_forward(pre, c_prev, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """One step's pointwise update from the pre-activations [BLOCK_B, 4·BLOCK_H] and c_{t-1} [BLOCK_B, BLOCK_H].

    Returns (activated gates in interleaved order, c_t, h_t), all in the accumulation dtype.
    """
    act = gate_activations(pre, 4 * BLOCK_H)
    i, f, g, o = split_gates(act, BLOCK_B, BLOCK_H)
    c = f * c_prev + i * g
    return act, c, o * tanh(c)


@triton.jit
def cell_backward(dh, dc, act, c, c_prev, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """BPTT through one step's pointwise update.

    dh, dc: gradients reaching h_t and c_t from the outputs and from step t+1; act: the saved gates;
    c, c_prev: c_t and c_{t-1}. Returns (dgates [BLOCK_B, 4·BLOCK_H] interleaved, dc_{t-1}).
    """
    i, f, g, o = split_gates(act, BLOCK_B, BLOCK_H)
    tc = tanh(c)
    dc = dc + dh * o * (1.0 - tc * tc)
    d_i = dc * g * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - g * g)
    d_o = dh * tc * o * (1.0 - o)
    return join_gates(d_i, d_f, d_g, d_o, BLOCK_B, BLOCK_H), dc * f


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b with the accumulator's dtype.

    UPCAST is set only under the interpreter for bfloat16: triton's interpreter multiplies bfloat16 tiles
    as their raw uint16 bits. Products of bfloat16 values are exact in float32, so the upcast computes what
    the tensor cores compute (up to summation order).
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def unit_tile(pid_b, pid_h, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The tile a program owns: batch rows rb, hidden units rh and their interleaved gate columns rg; the
    masks of rows (mb), of [rows, units] (m_h) and [rows, gate columns] (m_g); row-major offsets into
    [B, H] (off_h) and [B, 4H] (off_g) tensors."""
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rg = pid_h * 4 * BLOCK_H + tl.arange(0, 4 * BLOCK_H)
    mb = rb < B
    m_h = mb[:, None] & (rh < H)[None, :]
    m_g = mb[:, None] & (rg < 4 * H)[None, :]
    off_h = rb[:, None] * H + rh[None, :]
    off_g = rb[:, None] * (4 * H) + rg[None, :]
    return rb, rh, rg, mb, m_h, m_g, off_h, off_g


@triton.jit
def sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS: tl.constexpr):
    """Each row's sequence length (T for every row without lengths; 0 for rows past B)."""
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
    else:
        lens = tl.where(mb, T, 0)
    return lens


@triton.jit
def add_rows_times_wt(pre, a_ptr, w_ptr, K, rb, mb, rg, G, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """pre + a[rb, :K] · w[rg, :K]ᵀ, reduced over K in BLOCK_K chunks (a [*, K] and w [G, K] row-major)."""
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        a_k = tl.load(a_ptr + rb[:, None] * K + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        w_k = tl.load(w_ptr + rg[None, :] * K + rk[:, None], mask=mk[:, None] & (rg < G)[None, :], other=0.0)
        pre = mma(a_k, w_k, pre, DOT_PRECISION, UPCAST_DOT)
    return pre
