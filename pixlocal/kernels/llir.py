"""LLVM IR for the cpu backend's inner loops (llvmlite only; cpu.py wraps each builder in a
numba @intrinsic). Each function returns a codegen(context, builder, signature, args) for
array and integer arguments. The decode loops come in three widths: AVX2 (256-bit, 8-row
blocks), VNNI on 256 bits (AVX-VNNI or AVX512-VNNI, 8 rows) and VNNI on 512 bits (16 rows).

numba's cache for the kernels that embed these loops is keyed on this file too (jit.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llvmlite import ir

Codegen = Callable[[Any, ir.IRBuilder, Any, list], ir.Value]

# Software prefetch of the weight stream, into L2 (prefetcht1), PREFETCH bytes ahead (int4) or
# PREFETCH8 (int8, twice the bytes per multiply-add), and of int4's group records (scale and
# zero codes, a second stream of 1/8 the bytes at g32) PREFETCH_SZ ahead. Into L1
# (prefetcht0) a core kept fewer lines in flight. bench/prefetch.py on a Zen 4 host, GB/s on
# 1 / 2 threads, the old setting (L1; int4 2048 ahead, int8 1024) against these in the same
# run: int4 14336x5120 22.2-22.8 / 29.6-32.4 vs 24.0-24.2 / 31.5-32.7; int8 5120x14336
# 18.7-20.6 / 27.5-36.8 vs 22.2-23.7 / 30.0-42.5. Further ahead was no better (int4 8192-16384)
# or worse (int8 3072-8192); int8's scales prefetched ran slower (19.9 -> 17.8). Earlier, on
# the AVX2 host, 2048 ahead (into L1) took int4 from ~9 to ~12 GB/s. Prefetches past the end
# of an array never fault.
PREFETCH, PREFETCH8, PREFETCH_LOCALITY, PREFETCH_SZ = 6144, 2048, 2, 2048
# int4 with VNNI: the high nibbles meet vpdpbusd masked in place (16x their value; the sum
# comes out as 16 lo + hi, the 16 goes into the scale's exponent: the same bits) instead of
# shifted down first, which took one vgf2p8affineqb per 64 bytes on the multiply ports.
# bench/prefetch.py (4th field), same runs, 14336x5120 g32: 1 thread 22.2-23.9 -> 23.2-24.4
# GB/s, ahead in 7 of 8 more runs by 1-4%; 2 threads within 2%.
HI_MASK = True
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_FC = ("contract",)  # let LLVM fuse multiply and add into an FMA
ROWS = 8  # rows per interleaved block: one int32 lane of a 256-bit vector each
ROWS512 = 16  # the same with 512-bit vectors (VNNI on AVX-512 hosts)
NACC = 4  # int8, one token: running i32 sums per group (independent chains)


def _vt(n: int, t: ir.Type) -> ir.VectorType:
    return ir.VectorType(t, n)


def _vc(n: int, t: ir.Type, v: int | float | list) -> ir.Constant:
    return ir.Constant(_vt(n, t), v if isinstance(v, list) else [v] * n)


class _IR:
    """Terse IR building inside an intrinsic's codegen: array arguments by index."""

    def __init__(self, context, builder, signature, args):  # noqa: ANN001
        self.c, self.b, self.t, self.a = context, builder, signature.args, args

    def ptr(self, i: int, off: ir.Value, ty: ir.Type) -> ir.Value:
        data = self.c.make_array(self.t[i])(self.c, self.b, self.a[i]).data
        return self.b.bitcast(self.b.gep(data, [off]), ty.as_pointer())

    def load(self, i: int, off: ir.Value, ty: ir.Type) -> ir.Value:
        return self.b.load(self.ptr(i, off, ty), align=1)

    def k(self, v: int) -> ir.Constant:  # an index constant
        return ir.Constant(self.a[1].type, v)

    def fn(self, name: str, ret: ir.Type, *args: ir.Type) -> ir.Function:
        mod = self.b.module
        return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, args), name)

    def splat(self, x: ir.Value, n: int) -> ir.Value:
        v = self.b.insert_element(ir.Constant(_vt(n, x.type), None), x, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(v, v, _vc(n, _I32, 0))

    def var(self, ty: ir.Type) -> ir.Value:
        """A zeroed local; allocated in the entry block so LLVM keeps it in a register."""
        with self.b.goto_entry_block():
            p = self.b.alloca(ty)
        self.b.store(ir.Constant(ty, None), p)
        return p

    def prefetch(self, i: int, off: ir.Value, ahead: int | None = None) -> None:
        """Hint a read of array i at element off + ahead (bytes ahead of the stream; default
        PREFETCH, read when the loop is generated, as is PREFETCH_LOCALITY)."""
        p = self.ptr(i, self.b.add(off, self.k(PREFETCH if ahead is None else ahead)), _I8)
        pf = self.fn("llvm.prefetch.p0i8", ir.VoidType(), _I8.as_pointer(), _I32, _I32, _I32)
        self.b.call(pf, [p, ir.Constant(_I32, 0), ir.Constant(_I32, PREFETCH_LOCALITY),
                          ir.Constant(_I32, 1)])

    def fma_into(self, acc: ir.Value, x: ir.Value, y: ir.Value) -> None:
        b = self.b
        b.store(b.fadd(b.load(acc), b.fmul(x, y, flags=_FC), flags=_FC), acc)

    def loop(self, count: ir.Value, body) -> None:  # noqa: ANN001
        """for i in range(count): body(i)."""
        b, pre = self.b, self.b.block
        cond, inner, end = (b.append_basic_block(f"loop.{n}") for n in ("cond", "body", "end"))
        b.branch(cond)
        b.position_at_end(cond)
        i = b.phi(count.type)
        i.add_incoming(ir.Constant(count.type, 0), pre)
        b.cbranch(b.icmp_signed("<", i, count), inner, end)
        b.position_at_end(inner)
        body(i)
        i.add_incoming(b.add(i, ir.Constant(count.type, 1)), b.block)
        b.branch(cond)
        b.position_at_end(end)


def _sum(b: ir.IRBuilder, vals: list) -> ir.Value:
    tot = vals[0]
    for v in vals[1:]:
        tot = b.add(tot, v)
    return tot


def block(bits: int, T: int, vnni: bool = False, rows: int = ROWS) -> Codegen:
    """(qw, qoff, sz, soff, a, aoff, astr, d, e, doff, dstr, ngroups, g, bf16, out, ooff,
    ostr) → void: T tokens times one block of ROWS rows of an interleaved weight
    (cpu_layout.prepare; rows = 16 with 512-bit vectors, vnni only), all ngroups groups of
    G = g columns (32, 64 or 128). Token t's int8 activations start at a[aoff + t*astr], its
    group scales at d/e[doff + t*dstr]; its `rows` float32 results go to out[ooff + t*ostr:].

    The block's bytes from qw[qoff] are chunks of 32: chunk = dword i of each of the 8 rows
    (row-major bytes 4i..4i+3 of every row), so lane r of a 256-bit vector is row r and one
    broadcast dword of a token's activations meets 4 columns of all 8 rows. Each chunk is
    loaded (and, for int4, unpacked) once for all T tokens.
    int4: a dword holds columns j..j+3 of its group in the low nibbles and j+G/2.. in the high
    (qformat's order); vpmaddubsw (u8 weight x s8 activation → i16 pairs, at most 2*15*127
    per pair) summed over the 4 chunks of 32 columns still fits i16, then one vpmaddwd by ones
    → i32 per row. int8: vpsignb moves the weight's sign onto the activation, vpmaddubsw(|w|,
    ±a) (at most 2*127*127: -128 is never stored) and vpmaddwd. Per group, one 16-byte record
    at sz[soff + 16g] (int4: 8 e5m3 scale codes, then 8 zero codes) or 8 float16/bfloat16
    scale bits at sz[soff + 8g] (int8, bf16 says which) scale the dots: out_r += s_r * (d[g] *
    dot_r - z_r * e[g]) where d is the token's group scale and e = d * asum / 16 (int4 only).
    A group runs as G/32 passes of one unrolled 32-column body: unrolling all of G=128 made
    LLVM hoist its loads and spill.
    vnni: vpdpbusd (u8 x s8, 4 products summed into i32 lanes; AVX512-VNNI or AVX-VNNI)
    replaces vpmaddubsw + vpmaddwd + add, and int8 weights meet it as w + 128 (one xor; the
    offset comes off per group as 128 * asum * d = 2048 * e): int4 then costs 2 vector ops
    per 32-byte chunk less, int8 3 less. The loops were instruction-bound on a Zen 4 host
    (int4 ~19 GB/s per core from L3 at 2.6 GHz with vpmaddubsw).
    """
    assert rows == ROWS or vnni, "512-bit blocks are VNNI only"
    int4, W = bits == 4, 4 * rows  # W: bytes of one chunk (dword i of every row)
    sub_ch = 4 if int4 else 8  # chunks per 32 columns
    # running i32 sums per token: vpdpbusd's latency needs several chains at T=1
    nacc = (4 if T == 1 else 2) if vnni else (1 if int4 or T > 1 else NACC)
    mask = int4 and vnni and HI_MASK  # hi dots land in the odd sums, 16x

    def codegen(context, builder, signature, args):
        x, b = _IR(context, builder, signature, args), builder
        v8, v16w, v8d, v8f = _vt(W, _I8), _vt(16, _I16), _vt(rows, _I32), _vt(rows, _F32)
        if vnni:  # declare only the instructions this variant uses, at its vector width
            dpb = x.fn(f"llvm.x86.avx512.vpdpbusd.{32 * rows}", v8d, v8d, v8d, v8d)
        else:
            mub = x.fn("llvm.x86.avx2.pmadd.ub.sw", v16w, v8, v8)
            mwd = x.fn("llvm.x86.avx2.pmadd.wd", v8d, v16w, v16w)
            sign = x.fn("llvm.x86.avx2.psign.b", v8, v8, v8)
            absb = x.fn("llvm.abs.v32i8", v8, v8, ir.IntType(1))
            ones = _vc(16, _I16, 1)

        def dot_into(acc, w, a):  # acc += u8 w . s8 a per dword (vnni)
            b.store(b.call(dpb, [b.load(acc), b.bitcast(w, v8d), b.bitcast(a, v8d)]), acc)
        qoff, soff, aoff, astr, doff, dstr = args[1], args[3], args[5], args[6], args[9], \
            args[10]
        G = args[12]
        bf = b.icmp_signed("!=", args[13], ir.Constant(args[13].type, 0))
        outs = [x.var(v8f) for _ in range(T)]
        accs = [[x.var(v8d) for _ in range(nacc)] for _ in range(T)]
        aoffs = [b.add(aoff, b.mul(astr, x.k(t))) for t in range(T)]
        doffs = [b.add(doff, b.mul(dstr, x.k(t))) for t in range(T)]

        def act(off):  # int8 activations a[off:off+4] in every dword lane
            return b.bitcast(x.splat(x.load(4, off, _I32), rows), v8)

        def group(g):
            base = b.add(qoff, b.mul(g, b.mul(G, x.k(rows // 2 if int4 else rows))))
            gcol = b.mul(g, G)
            for acc in (a for row in accs for a in row):
                b.store(ir.Constant(v8d, None), acc)

            def sub(j):  # columns 32j.. of the group
                parts: list = [None] * T
                for c in range(sub_ch):
                    off = b.add(base, b.add(b.mul(j, x.k(W * sub_ch)), x.k(W * c)))
                    pf = (W * c) % 64 == 0  # one prefetch per cache line
                    v = x.load(0, off, v8)
                    if int4:  # dword 4j + c of each row: columns 16j + 4c.. (lo), + G/2 (hi)
                        if PREFETCH and pf:
                            x.prefetch(0, off)
                        col = b.add(gcol, b.add(b.mul(j, x.k(16)), x.k(4 * c)))
                        lo = b.and_(v, _vc(W, _I8, 15))
                        hi = b.and_(v, _vc(W, _I8, -16)) if mask else \
                            b.and_(b.lshr(v, _vc(W, _I8, 4)), _vc(W, _I8, 15))
                        for t in range(T):
                            ct = b.add(aoffs[t], col)
                            if vnni:
                                dot_into(accs[t][(2 * c) % nacc], lo, act(ct))
                                dot_into(accs[t][(2 * c + 1) % nacc], hi,
                                         act(b.add(ct, b.lshr(G, x.k(1)))))
                                continue
                            p = b.add(b.call(mub, [lo, act(ct)]),
                                      b.call(mub, [hi, act(b.add(ct, b.lshr(G, x.k(1))))]))
                            parts[t] = p if parts[t] is None else b.add(parts[t], p)
                    else:
                        if PREFETCH8 and pf:
                            x.prefetch(0, off, PREFETCH8)
                        col = b.add(gcol, b.add(b.mul(j, x.k(32)), x.k(4 * c)))
                        if vnni:
                            u = b.xor(v, _vc(W, _I8, -128))  # w + 128 as u8
                            for t in range(T):
                                dot_into(accs[t][c % nacc], u, act(b.add(aoffs[t], col)))
                            continue
                        w = b.call(absb, [v, ir.Constant(ir.IntType(1), 0)])
                        for t in range(T):
                            a = act(b.add(aoffs[t], col))
                            p = b.call(mub, [w, b.call(sign, [a, v])])
                            acc = accs[t][c % nacc]
                            b.store(b.add(b.load(acc), b.call(mwd, [p, ones])), acc)
                if int4 and not vnni:  # |part| <= 4 * 7620
                    for t in range(T):
                        acc = accs[t][0]
                        b.store(b.add(b.load(acc), b.call(mwd, [parts[t], ones])), acc)

            x.loop(b.lshr(G, x.k(5)), sub)
            if int4:
                roff = b.add(soff, b.mul(g, x.k(2 * rows)))
                if PREFETCH_SZ:
                    x.prefetch(2, roff, PREFETCH_SZ)
                rec = x.load(2, roff, _vt(2 * rows, _I8))
                sc = b.zext(b.shuffle_vector(rec, rec, _vc(rows, _I32, list(range(rows)))), v8d)
                zc = b.zext(b.shuffle_vector(rec, rec, _vc(rows, _I32,
                                                            list(range(rows, 2 * rows)))), v8d)
                # the scale's exponent takes 4 off when the dots are 16x (mask): exact
                s = b.bitcast(b.shl(b.add(sc, _vc(rows, _I32, 776 if mask else 808)),
                                    _vc(rows, _I32, 20)), v8f)
                zf = b.uitofp(b.shl(zc, _vc(rows, _I32, 4)) if mask else zc, v8f)
            else:
                bits16 = x.load(2, b.add(soff, b.mul(g, x.k(rows))), _vt(rows, _I16))
                s = b.select(bf, b.bitcast(b.shl(b.zext(bits16, v8d), _vc(rows, _I32, 16)), v8f),
                             b.fpext(b.bitcast(bits16, _vt(rows, ir.HalfType())), v8f))
            for t in range(T):
                sums = [b.load(acc) for acc in accs[t]]
                if mask:  # 16 lo + hi
                    sums = [b.shl(_sum(b, sums[0::2]), _vc(rows, _I32, 4)), *sums[1::2]]
                tot = _sum(b, sums)
                dg = x.splat(b.load(x.ptr(7, b.add(doffs[t], g), _F32)), rows)
                dot = b.fmul(b.sitofp(tot, v8f), dg)
                if int4 or vnni:
                    e = x.splat(b.load(x.ptr(8, b.add(doffs[t], g), _F32)), rows)
                    z = zf if int4 else _vc(rows, _F32, 2048.0)  # int8: the +128 offset
                    dot = b.fsub(dot, b.fmul(z, e, flags=_FC), flags=_FC)
                x.fma_into(outs[t], s, dot)

        x.loop(args[11], group)
        for t in range(T):
            o = b.add(args[15], b.mul(args[16], x.k(t)))
            b.store(b.load(outs[t]), x.ptr(14, o, v8f), align=4)
        return context.get_dummy_value()

    return codegen


def deqrow(int4: bool, bf: bool) -> Codegen:
    """(qw, qoff, s, z, ngroups, g, out, ooff) → void: dequantize groups j < ngroups of one
    row of qw (int4 bytes or int8, from flat offset qoff) with float32 scales s[j] and int4
    zero codes z[j] into out from flat offset ooff, 16 weights per vector: float32, or (bf)
    uint16 holding bfloat16, rounded to nearest even."""
    def codegen(context, builder, signature, args):
        x, b, g_ = _IR(context, builder, signature, args), builder, args[5]
        v16, f16, i16 = _vt(16, _I8), _vt(16, _F32), _vt(16, _I32)

        def store(vals, off):
            if bf:
                u = b.bitcast(vals, i16)
                odd = b.and_(b.lshr(u, _vc(16, _I32, 16)), _vc(16, _I32, 1))
                u = b.add(u, b.add(odd, _vc(16, _I32, 0x7FFF)))
                vals = b.trunc(b.lshr(u, _vc(16, _I32, 16)), _vt(16, _I16))
            b.store(vals, x.ptr(6, b.add(args[7], off), vals.type), align=2)

        def group(j):
            sj = b.load(x.ptr(2, j, _F32))
            sc = x.splat(sj, 16)
            if int4:
                zf = b.uitofp(b.load(x.ptr(3, j, _I8)), _F32)
                mn = x.splat(b.fmul(b.fmul(zf, ir.Constant(_F32, -1 / 16)), sj), 16)
            base = b.mul(j, g_)

            def chunk(c):
                c16 = b.mul(c, x.k(16))
                v = x.load(0, b.add(args[1], b.add(b.sdiv(base, x.k(2 if int4 else 1)), c16)),
                           v16)
                if not int4:
                    return store(b.fmul(b.sitofp(v, f16), sc), b.add(base, c16))
                for k, nib in enumerate((b.and_(v, _vc(16, _I8, 15)), b.lshr(v, _vc(16, _I8, 4)))):
                    w = b.fadd(b.fmul(b.uitofp(nib, f16), sc), mn)  # exact: see qformat
                    store(w, b.add(b.add(base, c16), b.sdiv(g_, x.k(2)) if k else x.k(0)))

            x.loop(b.sdiv(g_, x.k(32 if int4 else 16)), chunk)

        x.loop(args[4], group)
        return context.get_dummy_value()

    return codegen
