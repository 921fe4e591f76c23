"""What every kernel path shares: activations, the cell update and its derivative, dots, tile indices, and the
per-step inputs of the options beyond torch (segment resets, a recurrent-dropout mask).

Dimension legend
    D        directions of one launch (grid axis "d"); T steps in each direction's own order
    B        batch;  H hidden units;  P projected size (P = H without projection);  G = 4H gate columns
    BLOCK_B  batch rows per program;  BLOCK_H hidden units per program

Gate layout. In memory every weight, gate and gate-gradient tensor keeps ``torch.nn.LSTM``'s gate-blocked order:
gate k ∈ {i=0, f=1, g=2, o=3} of unit u is row / column ``k·H + u``. In registers a program's gate tile is
[BLOCK_B, 4·BLOCK_H] in *unit-interleaved* order: column ``4j + k`` is gate k of the program's unit j. That order
lets one program own all four gates of its units with one ``tl.dot`` (the four gate matmuls fused), and
:func:`unit_tile` maps each register column to its gate-blocked memory column, so nothing is ever re-laid out
on the host.

Addressing. Per-direction and per-step offsets are 64-bit (``d`` and ``s`` are widened before they meet a
stride); offsets within one step (a batch row times a row stride plus a column) are 32-bit, which
``dispatch.check_offset_limits`` guarantees before any launch.

Loops over a runtime bound are ``while`` loops: Triton 3.6's interpreter cannot take a tensor as a ``range``
bound under NumPy ≥ 2.4, and a ``while`` loop compiles to the same code.
"""
import triton
import triton.language as tl


@triton.jit
def divide(a, b):
    """a / b correctly rounded, as the interpreter computes it: float32 ``/`` compiles to the approximate
    ``div.full.f32`` (2 ulp), so float32 uses ``div_rn``; float64 ``/`` is already exact."""
    if b.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def sigmoid(x):
    # exp(-|x|) lies in (0, 1], so neither branch can overflow for any finite or infinite x.
    e = tl.exp(-tl.abs(x))
    r = divide(1.0, 1.0 + e)
    return tl.where(x >= 0, r, e * r)


@triton.jit
def tanh(x):
    # libdevice.tanh does not run in the interpreter; tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|)
    # is finite for every input and keeps the sign exact.
    e = tl.exp(-2.0 * tl.abs(x))
    t = divide(1.0 - e, 1.0 + e)
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
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr):
    """acc + a·b with the accumulator's dtype, in the form the plan chose (``dispatch.dot_form``):

    "dot"     ``tl.dot`` (tensor cores; float32 with DOT_PRECISION "ieee" on the FMA units);
    "upcast"  under the interpreter for bfloat16: triton's interpreter multiplies bfloat16 tiles as their raw
              uint16 bits; products of bfloat16 values are exact in float32, so the upcast computes what the
              tensor cores compute (up to summation order);
    "fma"     compiled float64 (a dtype for checking, not for speed): products summed on the FMA units, since
              triton 3.6 cannot lower some float64 tensor-core dots whose operand went through a select
              ("fp64 don't support largeK MMA").
    """
    if DOT_FORM == "upcast":
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if DOT_FORM == "fma":
        out = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    return out


@triton.jit
def program_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The tile this program owns, from its grid position (batch tile, hidden-unit tile, direction d): batch rows
    ``rb`` and hidden units ``rh``; for its interleaved gate columns (register column 4j + k) the gate-blocked
    memory column ``col_g`` = k·H + unit; the masks of rows (mb), of gate columns that exist (m_col), of
    [rows, units] (m_h) and of [rows, gate columns] (m_g); the in-step offsets of [rows, units] in a [B, H]
    tensor (off_h) and of [rows, gate columns] in a [B, 4H] one (off_g)."""
    d = tl.program_id(2)
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rg = tl.arange(0, 4 * BLOCK_H)
    unit_g = tl.program_id(1) * BLOCK_H + rg // 4
    col_g = (rg % 4) * H + unit_g
    mb = rb < B
    m_col = unit_g < H
    m_h = mb[:, None] & (rh < H)[None, :]
    m_g = mb[:, None] & m_col[None, :]
    off_h = rb[:, None] * H + rh[None, :]
    off_g = rb[:, None] * (4 * H) + col_g[None, :]
    return d, rb, rh, col_g, mb, m_col, m_h, m_g, off_h, off_g


@triton.jit
def in_direction(base, d, dir_stride):
    """``base`` advanced to direction d (64-bit offset)."""
    return base + tl.cast(d, tl.int64) * dir_stride


@triton.jit
def at(base, d, dir_stride, s, step_stride):
    """``base`` advanced to direction d, step s: both offsets in 64-bit arithmetic. (``tl.cast``, not ``.to``:
    an integer argument equal to 1 reaches the kernel as a constant, which has no ``.to``.)"""
    return base + tl.cast(d, tl.int64) * dir_stride + tl.cast(s, tl.int64) * step_stride


@triton.jit
def sequence_lengths(len_ptr, rb, mb, T, HAS_LENGTHS: tl.constexpr):
    """Each row's sequence length (T for every row without lengths; 0 for rows past B)."""
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
    else:
        lens = tl.where(mb, T, 0)
    return lens


@triton.jit
def starts_segment(reset_ptr, d, stride_rd, s, B, rb, mb, lens, HAS_RESETS: tl.constexpr):
    """[BLOCK_B, 1] bool: rows whose step s starts a new segment (from h0/c0) — resets [D, T, B]. Only rows
    still running at s restart; so a step s ≥ T (lengths ≤ T) restarts nothing, and callers may ask about
    "the next step" unconditionally."""
    if HAS_RESETS:
        flags = tl.load(at(reset_ptr, d, stride_rd, s, B) + rb, mask=mb & (s < lens), other=0)
        restart = flags != 0
    else:
        restart = tl.zeros(rb.shape, tl.int1)
    return restart[:, None]


@triton.jit
def saved_step(gates_ptr, cs_ptr, dcs_ptr, reset_ptr, dc, valid, d, s, B, stride_gd, stride_gt, stride_cd, stride_ct,
               stride_dcd, stride_dct, stride_rd, rb, mb, lens, off_g, off_h, m_g, m_h,
               HAS_DCS: tl.constexpr, HAS_RESETS: tl.constexpr):
    """What BPTT through step s reads of the forward's saved state (gates [D, T, B, 4H], cs [D, T+1, B, H]): the
    activated gates, c_s and c_{s-1} — c0 = cs[d, 0] where step s starts a segment — and dc plus the gradient
    reaching the returned cell state c_s (dcs [D, T, B, H]). Returns (dc, act, c, c_prev, restart)."""
    acc_ty = cs_ptr.dtype.element_ty
    if HAS_DCS:
        dc += tl.where(valid, tl.load(at(dcs_ptr, d, stride_dcd, s, stride_dct) + off_h, mask=m_h,
                                      other=0.0).to(acc_ty), 0.0)
    act = tl.load(at(gates_ptr, d, stride_gd, s, stride_gt) + off_g, mask=m_g, other=0.0).to(acc_ty)
    c = tl.load(at(cs_ptr, d, stride_cd, s + 1, stride_ct) + off_h, mask=m_h, other=0.0)
    c_prev = tl.load(at(cs_ptr, d, stride_cd, s, stride_ct) + off_h, mask=m_h, other=0.0)
    restart = starts_segment(reset_ptr, d, stride_rd, s, B, rb, mb, lens, HAS_RESETS)
    if HAS_RESETS:
        c_prev = tl.where(restart, tl.load(in_direction(cs_ptr, d, stride_cd) + off_h, mask=m_h, other=0.0), c_prev)
    return dc, act, c, c_prev, restart


@triton.jit
def dropout_mask(mask_ptr, d, stride_md, cols, m_rows_cols, rb, K, acc_ty, HAS_MASK: tl.constexpr):
    """The recurrent-dropout mask of [rows, cols] ([D, B, K] in memory: 0 or 1/(1-p)) in the accumulation
    dtype ``acc_ty``; a scalar 1 without a mask. h·mask is formed in that dtype and rounded once, as the
    reference's product in the input dtype is."""
    if HAS_MASK:
        m = tl.load(in_direction(mask_ptr, d, stride_md) + rb[:, None] * K + cols[None, :], mask=m_rows_cols,
                    other=0.0).to(acc_ty)
    else:
        m = 1.0
    return m


@triton.jit
def add_rows_times_wt(pre, a_ptr, w_ptr, K, rb, mb, col_g, m_col, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, DOT_FORM: tl.constexpr,
                      h0_ptr, restart, mask_ptr, HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr):
    """pre + a'[rb, :K] · w[col_g, :K]ᵀ, reduced over K in BLOCK_K chunks (a [*, K] and w [G, K] row-major).

    a' is a, except that rows flagged in ``restart`` read h0 instead (HAS_RESETS), times the dropout mask
    [*, K] (HAS_MASK): the operand of the recurrent dot. ``m_col`` masks the gate columns that exist.
    """
    k0 = 0
    while k0 < K:
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        m_a = mb[:, None] & mk[None, :]
        a_k = tl.load(a_ptr + rb[:, None] * K + rk[None, :], mask=m_a, other=0.0)
        if HAS_RESETS:
            a_k = tl.where(restart, tl.load(h0_ptr + rb[:, None] * K + rk[None, :], mask=m_a, other=0.0), a_k)
        if HAS_MASK:
            a_k = (a_k.to(pre.dtype) * tl.load(mask_ptr + rb[:, None] * K + rk[None, :], mask=m_a, other=0.0)
                   .to(pre.dtype)).to(a_ptr.dtype.element_ty)
        w_k = tl.load(w_ptr + col_g[None, :] * K + rk[:, None], mask=mk[:, None] & m_col[None, :], other=0.0)
        pre = mma(a_k, w_k, pre, DOT_PRECISION, DOT_FORM)
        k0 += BLOCK_K
    return pre
