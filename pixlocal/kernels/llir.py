"""LLVM IR for the cpu backend's inner loops (llvmlite only; cpu.py wraps each builder in a
numba @intrinsic). Each function returns a codegen(context, builder, signature, args) for
array and integer arguments; W is the vector width in bytes (64: AVX-512BW, 32: AVX2).

numba's cache is keyed on cpu.py's contents, not this file's: after editing this file bump
cpu._LLIR_REVISION (or clear pixlocal/kernels/__pycache__) so the kernels compile again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llvmlite import ir

Codegen = Callable[[Any, ir.IRBuilder, Any, list], ir.Value]

# Software prefetch distance of the weight stream: 2048 bytes ahead took int4 decode from
# ~9 to ~12 GB/s here (1024: ~11, 4096: same as 2048); prefetches past the end never fault.
PREFETCH = 2048
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_FC = ("contract",)  # let LLVM fuse multiply and add into an FMA
_MADDUBS = {64: "llvm.x86.avx512.pmaddubs.w.512", 32: "llvm.x86.avx2.pmadd.ub.sw"}
_MADDWD = {64: "llvm.x86.avx512.pmaddw.d.512", 32: "llvm.x86.avx2.pmadd.wd"}


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

    def prefetch(self, i: int, off: ir.Value) -> None:
        """Hint a read of array i at element off (PREFETCH bytes ahead of the stream)."""
        p = self.ptr(i, self.b.add(off, self.k(PREFETCH)), _I8)
        pf = self.fn("llvm.prefetch.p0i8", ir.VoidType(), _I8.as_pointer(), _I32, _I32, _I32)
        self.b.call(pf, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])

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

    def hsum(self, acc: ir.Value, n: int) -> ir.Value:
        red = self.fn(f"llvm.vector.reduce.fadd.v{n}f32", _F32, _F32, _vt(n, _F32))
        return self.b.call(red, [ir.Constant(_F32, 0.0), self.b.load(acc)])


def q4dot(W: int) -> Codegen:
    """(qw, qoff, lo, hi, f, nchunks, g) → float32: the sum over chunks c < nchunks of W bytes
    of the int4 row at flat offset qoff of qw of f[group] * (int dot of the nibbles with the
    token's lo/hi halves); g is the group size."""
    def codegen(context, builder, signature, args):
        nl, x = W // 4, _IR(context, builder, signature, args)
        if W == 0:
            return ir.Constant(_F32, 0.0)
        b, g_ = builder, args[6]
        acc = x.var(_vt(nl, _F32))
        mub = x.fn(_MADDUBS[W], _vt(W // 2, _I16), _vt(W, _I8), _vt(W, _I8))
        mwd = x.fn(_MADDWD[W], _vt(nl, _I32), _vt(W // 2, _I16), _vt(W // 2, _I16))
        # lane l sums weights 8l..8l+7 of the chunk (lo and hi): group c*2W/g + 8l//g
        masks = {gs: _vc(nl, _I32, [8 * lane // gs for lane in range(nl)])
                 for gs in (32, 64, 128)}

        def body(c):
            off = b.mul(c, x.k(W))
            v = x.load(0, b.add(args[1], off), _vt(W, _I8))
            if PREFETCH:
                x.prefetch(0, b.add(args[1], off))
            p = b.add(b.call(mub, [b.and_(v, _vc(W, _I8, 15)), x.load(2, off, _vt(W, _I8))]),
                      b.call(mub, [b.lshr(v, _vc(W, _I8, 4)), x.load(3, off, _vt(W, _I8))]))
            dots = b.sitofp(b.call(mwd, [p, _vc(W // 2, _I16, 1)]), _vt(nl, _F32))
            fv = x.load(4, b.sdiv(b.mul(c, x.k(2 * W)), g_), _vt(nl, _F32))
            s32, s64, s128 = (b.shuffle_vector(fv, fv, masks[gs]) for gs in (32, 64, 128))
            sv = b.select(b.icmp_signed("==", g_, x.k(32)), s32,
                          b.select(b.icmp_signed("==", g_, x.k(64)), s64, s128))
            x.fma_into(acc, dots, sv)

        x.loop(args[5], body)
        return x.hsum(acc, nl)

    return codegen


def q8dot(W: int) -> Codegen:
    """(qw, qoff, a16, f, ngroups, g) → float32: the sum over groups j < ngroups of f[j] *
    (int dot of the int8 row at flat offset qoff of qw with the token's int16 a16)."""
    def codegen(context, builder, signature, args):
        x = _IR(context, builder, signature, args)
        if W == 0:
            return ir.Constant(_F32, 0.0)
        b, g_ = builder, args[5]
        nl, nw = W // 4, W // 2  # i32 lanes, i16 lanes = weights per multiply-add
        acc, isum = x.var(_vt(nl, _F32)), x.var(_vt(nl, _I32))
        mwd = x.fn(_MADDWD[W], _vt(nl, _I32), _vt(nw, _I16), _vt(nw, _I16))

        def group(j):
            b.store(ir.Constant(_vt(nl, _I32), None), isum)
            base = b.mul(j, g_)

            def chunk(c):
                off = b.add(base, b.mul(c, x.k(nw)))
                w = b.sext(x.load(0, b.add(args[1], off), _vt(nw, _I8)), _vt(nw, _I16))
                if PREFETCH:
                    x.prefetch(0, b.add(args[1], off))
                b.store(b.add(b.load(isum), b.call(mwd, [w, x.load(2, off, _vt(nw, _I16))])),
                        isum)

            x.loop(b.sdiv(g_, x.k(nw)), chunk)
            fj = x.splat(b.load(x.ptr(3, j, _F32)), nl)
            x.fma_into(acc, b.sitofp(b.load(isum), _vt(nl, _F32)), fj)

        x.loop(args[4], group)
        return x.hsum(acc, nl)

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
