"""Eight-lane vector operations for numba kernels (imported only when numba is present).

numba has no vector type, and LLVM does not turn eight scalar accumulators into one vector register by itself (it
vectorizes the entry loop instead, gathering one float per entry). :data:`float32x8` is an LLVM ``<8 x float>``
value that numba code can carry in variables; the intrinsics below load, multiply-add and read it. The ``*_mask8``
intrinsics compare 8 float32 bit patterns at once and return one bit per entry, and :func:`store_offsets8` writes
the positions of a mask's set bits in one store (the codec's encoder). On AVX2 one such value is one register;
elsewhere LLVM splits it into the registers the target has.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

_VECTOR = ir.VectorType(ir.FloatType(), 8)
_INTS = ir.VectorType(ir.IntType(32), 8)
_CONTRACT = ("contract",)  # lets LLVM fuse a multiply and an add into one FMA where the target has it


class Float32x8(types.Type):
    """numba type of an LLVM ``<8 x float>`` value."""

    def __init__(self) -> None:
        super().__init__(name="float32x8")


float32x8 = Float32x8()


@register_model(Float32x8)
class _Float32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _pointer(context, builder, array_type, array, index, vector=_VECTOR):
    """Pointer to ``array[index]`` (a flat C-contiguous array), seen as a pointer to one ``vector`` (8 floats by
    default)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index], inbounds=True), vector.as_pointer())


def _splat(context, builder, value, value_type, vector=_VECTOR, element=types.float32):
    """``value`` cast to ``element`` in all 8 lanes of a ``vector``."""
    value = context.cast(builder, value, value_type, element)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(
        one, ir.Constant(vector, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8)
    )


def _multiply_add(context, builder, accumulator, factor, factor_type, vector):
    """LLVM ``accumulator + splat(factor) * vector``, fusable into one FMA."""
    product = builder.fmul(_splat(context, builder, factor, factor_type), vector, flags=_CONTRACT)
    return builder.fadd(accumulator, product, flags=_CONTRACT)


@intrinsic
def zeros8(typingctx):
    """A vector of 8 zeros."""

    def codegen(context, builder, signature, args):
        return ir.Constant(_VECTOR, None)

    return float32x8(), codegen


@intrinsic
def load8(typingctx, array, index):
    """``array[index:index + 8]`` of a flat float32 array, as a vector (no bounds check)."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(_pointer(context, builder, signature.args[0], args[0], args[1]), align=4)

    return float32x8(array, index), codegen


@intrinsic
def fma8(typingctx, accumulator, factor, vector):
    """``accumulator + factor * vector`` with a scalar ``factor``."""
    if accumulator != float32x8 or vector != float32x8 or not isinstance(factor, (types.Integer, types.Float)):
        return None

    def codegen(context, builder, signature, args):
        return _multiply_add(context, builder, args[0], args[1], signature.args[1], args[2])

    return float32x8(accumulator, factor, vector), codegen


@intrinsic
def add8(typingctx, left, right):
    """``left + right``."""
    if left != float32x8 or right != float32x8:
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return float32x8(left, right), codegen


@intrinsic
def lane8(typingctx, vector, index):
    """Element ``index`` (0-7) of ``vector``, as a float32."""
    if vector != float32x8 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], args[1])

    return types.float32(vector, index), codegen


@intrinsic
def fma8_into(typingctx, array, index, factor, vector):
    """``array[index:index + 8] += factor * vector`` in a flat float32 array (no bounds check)."""
    if not (isinstance(array, types.Array) and array.dtype == types.float32 and vector == float32x8):
        return None

    def codegen(context, builder, signature, args):
        pointer = _pointer(context, builder, signature.args[0], args[0], args[1])
        summed = _multiply_add(context, builder, builder.load(pointer, align=4), args[2], signature.args[2], args[3])
        builder.store(summed, pointer, align=4)
        return context.get_dummy_value()

    return types.none(array, index, factor, vector), codegen


# -- bit patterns: 8 uint32 entries compared at once, one result bit per entry ------------------------------------


def _int_splat(context, builder, value, value_type):
    """``value`` cast to int32 in all 8 lanes."""
    return _splat(context, builder, value, value_type, _INTS, types.int32)


def _load_ints(context, builder, array_type, array, index):
    """``array[index:index + 8]`` of a flat 32-bit integer array, as an ``<8 x i32>``."""
    return builder.load(_pointer(context, builder, array_type, array, index, _INTS), align=4)


def _to_mask(builder, bits):
    """An ``<8 x i1>`` as an int64 with bit ``j`` set for lane ``j``."""
    return builder.zext(builder.bitcast(bits, ir.IntType(8)), ir.IntType(64))


def _words(array) -> bool:
    return isinstance(array, types.Array) and array.dtype in (types.uint32, types.int32) and array.ndim == 1


def _magnitude_and_cut(context, builder, signature, args):
    """Lanes' magnitudes (sign bit cleared) and the cut of each lane's sign (``args[2]`` positive, ``args[3]``
    negative)."""
    values = _load_ints(context, builder, signature.args[0], args[0], args[1])
    magnitude = builder.and_(values, ir.Constant(_INTS, [0x7FFFFFFF] * 8))
    negative = builder.icmp_signed("<", values, ir.Constant(_INTS, None))
    cut = builder.select(
        negative,
        _int_splat(context, builder, args[3], signature.args[3]),
        _int_splat(context, builder, args[2], signature.args[2]),
    )
    return magnitude, cut


@intrinsic
def above_mask8(typingctx, bits, index, cut_positive, cut_negative):
    """Bit ``j`` set when entry ``index + j`` of the float32 bit patterns ``bits`` has a magnitude pattern above the
    cut of its sign (cuts below 2**31; no bounds check)."""
    if not (_words(bits) and isinstance(cut_positive, types.Integer) and isinstance(cut_negative, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        magnitude, cut = _magnitude_and_cut(context, builder, signature, args)
        return _to_mask(builder, builder.icmp_signed(">", magnitude, cut))

    return types.int64(bits, index, cut_positive, cut_negative), codegen


@intrinsic
def tie_mask8(typingctx, bits, index, cut_positive, cut_negative):
    """Bit ``j`` set when entry ``index + j``'s magnitude pattern equals the cut of its sign and is not zero."""
    if not (_words(bits) and isinstance(cut_positive, types.Integer) and isinstance(cut_negative, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        magnitude, cut = _magnitude_and_cut(context, builder, signature, args)
        equal = builder.icmp_signed("==", magnitude, cut)
        nonzero = builder.icmp_signed("!=", magnitude, ir.Constant(_INTS, None))
        return _to_mask(builder, builder.and_(equal, nonzero))

    return types.int64(bits, index, cut_positive, cut_negative), codegen


@intrinsic
def high_mask8(typingctx, bits, index, first, second):
    """Bit ``j`` set when the high 16 bits of entry ``index + j`` (sign and magnitude) equal ``first`` or
    ``second``."""
    if not (_words(bits) and isinstance(first, types.Integer) and isinstance(second, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        values = _load_ints(context, builder, signature.args[0], args[0], args[1])
        high = builder.lshr(values, ir.Constant(_INTS, [16] * 8))
        one = builder.icmp_signed("==", high, _int_splat(context, builder, args[2], signature.args[2]))
        other = builder.icmp_signed("==", high, _int_splat(context, builder, args[3], signature.args[3]))
        return _to_mask(builder, builder.or_(one, other))

    return types.int64(bits, index, first, second), codegen


@intrinsic
def store_offsets8(typingctx, out, at, table, mask, start):
    """``out[at:at + 8] = start + table[mask * 8:mask * 8 + 8]`` for int32 ``out`` and ``table`` (no bounds check):
    with ``table`` listing each byte's set bits first, the positions of ``mask``'s set bits land in order at ``at``."""
    if not (
        isinstance(out, types.Array) and out.dtype == types.int32 and isinstance(table, types.Array)
        and table.dtype == types.int32
    ):  # fmt: skip
        return None

    def codegen(context, builder, signature, args):
        mask = context.cast(builder, args[3], signature.args[3], types.int64)
        row = builder.mul(mask, ir.Constant(ir.IntType(64), 8))
        offsets = _load_ints(context, builder, signature.args[2], args[2], row)
        positions = builder.add(offsets, _int_splat(context, builder, args[4], signature.args[4]))
        index = context.cast(builder, args[1], signature.args[1], types.int64)
        builder.store(positions, _pointer(context, builder, signature.args[0], args[0], index, _INTS), align=4)
        return context.get_dummy_value()

    return types.none(out, at, table, mask, start), codegen
