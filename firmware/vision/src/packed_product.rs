//! tract's packing of a matrix product's activations and the product, as one op that
//! packs into memory it reuses.
//!
//! tract's optimised plan computes a float convolution (and the Winograd layers' batched
//! products) as `OptMatMulPack`, which copies the activations into the kernel's panel
//! layout in a new buffer, boxed per matrix (36 matrices for an F(4×4) layer), then
//! `OptMatMul`, which reads them. [`PackedProduct`] takes the unpacked activations, packs
//! each matrix into one buffer lent by the pool (reuse.rs) with tract's own packing
//! routine, and runs tract's kernel with the same fused operations (bias, LeakyRelu,
//! store) into the pooled output: the same products in the same order, no allocation.
//! The int8 model's products that tract runs with its dot-product kernels (x86 VNNI,
//! aarch64 SDOT: activations in `PackedI8K4`) the same way, packed with int8_pack.rs's
//! row packer (the same bytes as tract's).

use tract_linalg::mmm::{
    AsInputValue, FusedSpec, MMMInputFormat, MMMInputValue, MatMatMul, PackedExoticFact, PackedMatrixStorage,
    ScratchSpace,
};
use tract_linalg::pack::{PackedFormat, PackedI8K4};
use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::array::{Slice, TypedConcat};
use tract_nnef::tract_core::ops::matmul::optimized::{
    MapOutputAxisToInput, MatMulOperand, OptMatMul, ProtoFusedSpec,
};
use tract_nnef::tract_core::ops::matmul::pack::{DynPackedExoticFact, OptMatMulPack};

use crate::int8_pack::bytemuck_i8;
use crate::reuse::{EvalInto, Scratch};

/// Replaces each `OptMatMul` of the optimised plan that reads one `OptMatMulPack` of
/// float activations into plain panels or int8 ones into `PackedI8K4` (which nothing else
/// reads) with a [`PackedProduct`] reading the pack's input. Returns
/// how many it replaced.
pub fn packed_products(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let Some(op) = packed_product(model, id)? else { continue };
        let node = model.node(id);
        let mut inputs = node.inputs.clone();
        let pack = model.node(inputs[op.slot].node);
        inputs[op.slot] = pack.inputs[0];
        crate::fused::replace_node(model, id, "packed", op, &inputs)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The op for node `id` if it is a product this op covers.
fn packed_product(model: &TypedModel, id: usize) -> TractResult<Option<PackedProduct>> {
    let node = model.node(id);
    let Some(mm) = node.op_as::<OptMatMul>() else { return Ok(None) };
    if node.outputs.len() != 1 || node.outputs[0].fact.shape.as_concrete().is_none() {
        return Ok(None);
    }
    // The one AddMatMul, one of whose operands is an input.
    let matmuls: Vec<_> = mm
        .micro_ops
        .iter()
        .filter_map(|op| match op {
            ProtoFusedSpec::AddMatMul { a, b, packings, .. } => Some((a, b, packings)),
            _ => None,
        })
        .collect();
    let [(a, b, packings)] = &matmuls[..] else { return Ok(None) };
    // Panels extracted from another format (f16 weights) are not ours.
    if packings.iter().any(|p| p.1.is_some()) {
        return Ok(None);
    }
    for (side, operand) in [(Side::A, a), (Side::B, b)] {
        let MatMulOperand::Input(slot) = operand else { continue };
        let slot = *slot;
        let outlet = node.inputs[slot];
        let pack_node = model.node(outlet.node);
        let Some(pack) = pack_node.op_as::<OptMatMulPack>() else { continue };
        // Read only here, and at this slot only.
        if model.outlet_successors(outlet).len() != 1
            || node.inputs.iter().filter(|&&i| i == outlet).count() != 1
        {
            continue;
        }
        let x = model.outlet_fact(pack_node.inputs[0])?;
        let Some(shape) = x.shape.as_concrete() else { continue };
        let packed = &pack_node.outputs[0].fact;
        let Some(exotic) = packed.exotic_fact.as_ref().and_then(|f| f.downcast_ref::<DynPackedExoticFact>())
        else {
            continue;
        };
        // Every mode's format the one this op packs for this type: plain f32 panels, or
        // int8 in the dot-product kernels' layout.
        let ours = |format: &dyn MMMInputFormat| {
            if x.datum_type == f32::datum_type() {
                format.downcast_ref::<PackedFormat>().is_some_and(|f| f.dt == f32::datum_type())
            } else {
                x.datum_type == i8::datum_type() && format.downcast_ref::<PackedI8K4>().is_some()
            }
        };
        if !exotic.packers.iter().all(|p| ours(&**p)) {
            continue;
        }
        let mapping = pack.axes_mapping(&[x], &[packed])?;
        let k_axis = mapping.axis('K')?.inputs[0][0];
        let mn_axis = mapping.axis('M')?.inputs[0][0];
        let (k, mn) = (shape[k_axis], shape[mn_axis]);
        // The int8 packer reads whole rows: M (or N) contiguous.
        if x.datum_type == i8::datum_type()
            && (k == 0 || mn == 0 || (mn > 1 && Tensor::natural_strides(shape)[mn_axis] != 1))
        {
            continue;
        }
        // The kernel's format for the activations in each mode (what its packing expects).
        let mut facts = vec![];
        for (mode, mmm) in mm.mmm.iter().enumerate() {
            let (a_format, b_format) = &mmm.packings()[packings[mode].0];
            let format = if side == Side::A { a_format } else { b_format };
            if !ours(&**format) {
                return Ok(None);
            }
            facts.push(PackedExoticFact { format: format.clone(), mn: mn.to_dim(), k });
        }
        return Ok(Some(PackedProduct { mm: mm.clone(), slot, side, k_axis, mn_axis, facts, taps: tvec![] }));
    }
    Ok(None)
}

/// The panel layout the kernel reads the activations in.
#[derive(Clone, Copy)]
enum Panels<'f> {
    /// tract's plain panels (floats), packed with tract's routine.
    Plain(&'f PackedFormat),
    /// int8, 4 K values of a column side by side, packed with int8_pack.rs's.
    I8K4(&'f PackedI8K4),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Side {
    A,
    B,
}

/// `OptMatMulPack` and `OptMatMul` as one op: input `slot` is the activations, unpacked.
#[derive(Debug, Clone)]
pub struct PackedProduct {
    mm: OptMatMul,
    slot: usize,
    /// Which of the product's operands the activations are.
    side: Side,
    /// The activations' K and M (or N) axes.
    k_axis: usize,
    mn_axis: usize,
    /// The packed activations' format and size, per mode of the product.
    facts: Vec<PackedExoticFact>,
    /// None: the activations are input `slot`. Else the activation matrix's rows are
    /// read where they lie, these taps' rows one after the other (see
    /// [`tapped_products`]).
    taps: TVec<Tap>,
}

/// `rows` rows of the activations in input `input`, the first at element `start`, each
/// `stride` elements after the one before (a kernel tap's rows of a convolution's
/// patches: the channels of its padded, flattened input, from the tap's offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tap {
    input: usize,
    start: usize,
    rows: usize,
    stride: usize,
}

impl PartialEq for PackedProduct {
    fn eq(&self, other: &Self) -> bool {
        self.mm == other.mm
            && (self.slot, self.side, self.k_axis, self.mn_axis)
                == (other.slot, other.side, other.k_axis, other.mn_axis)
            && self.facts == other.facts
            && self.taps == other.taps
    }
}
impl Eq for PackedProduct {}

impl Op for PackedProduct {
    fn name(&self) -> StaticName {
        "DeskcamPackedProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.mm.info()?;
        info.push(format!("activations packed here ({:?} side)", self.side));
        if !self.taps.is_empty() {
            info.push(format!("read as {} taps of the patches' sources", self.taps.len()));
        }
        Ok(info)
    }

    op_as_typed_op!();
}

impl EvalOp for PackedProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        crate::reuse::eval_alone(self, &inputs)
    }
}

impl TypedOp for PackedProduct {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.mm.c_fact.clone()))
    }

    as_op!();
}

/// At most this many axes in a product's output (tract's here have 3 or 4; the pool
/// leaves others to tract).
pub(crate) const MAX_RANK: usize = 6;

impl EvalInto for PackedProduct {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, scratch: &mut Scratch) -> TractResult<()> {
        let mm = &self.mm;
        // Written only through the kernel's store (as tract's OptMatMul does).
        let output: &Tensor = output;
        let c_shape = output.shape();
        let (m, n, mode, mmm) = kernel(mm, c_shape)?;
        let x = &inputs[self.slot];
        let (k, mn) = if self.taps.is_empty() {
            (x.shape()[self.k_axis], x.shape()[self.mn_axis])
        } else {
            (self.facts[0].k, self.facts[0].mn.to_usize()?)
        };
        let Some(ProtoFusedSpec::AddMatMul { a, b, packings, geo }) =
            mm.micro_ops.iter().find(|op| matches!(op, ProtoFusedSpec::AddMatMul { .. }))
        else {
            bail!("no product in {:?}", mm);
        };
        let packing = packings[mode].0;
        let mapping = match self.side {
            Side::A => &geo.c_to_a_axis_mapping,
            Side::B => &geo.c_to_b_axis_mapping,
        };
        let fact = &self.facts[mode];
        ensure!((fact.k, fact.mn.to_usize()?) == (k, mn), "activations {:?} for {self:?}", x.shape());
        let panels = match fact.format.downcast_ref::<PackedFormat>() {
            Some(plain) => Panels::Plain(plain),
            None => Panels::I8K4(fact.format.downcast_ref::<PackedI8K4>().context("the kernel's panels")?),
        };
        // The activations' matrices: every axis but K and M, in order, as the pack's
        // output has them (its batch strides are the natural ones of that shape).
        let mut batch_shape: TVec<usize> = x.shape().into();
        batch_shape.remove(self.k_axis.max(self.mn_axis));
        batch_shape.remove(self.k_axis.min(self.mn_axis));
        let batch_axes: TVec<usize> =
            (0..x.rank()).filter(|&ax| ax != self.k_axis && ax != self.mn_axis).collect();
        let batch_strides = Tensor::natural_strides(&batch_shape);
        let x_strides = x.strides();
        let (size, panel_bytes, alignment) = match panels {
            Panels::Plain(format) => {
                (format.len(k, mn) * 4, format.single_panel_len(k) * 4, format.alignment())
            }
            Panels::I8K4(format) => {
                let (panel_bytes, size) = crate::int8_pack::packed_size(k, mn, format.r);
                (size, panel_bytes, format.alignment())
            }
        };
        // SAFETY: the packed buffer is sized and aligned for the format below.
        unsafe { scratch.packed.ensure_size_and_align(size.max(1), alignment) };
        let space = space_for(&mut scratch.mmm, mmm);
        let x_plain = x.try_as_plain_ram()?;
        each_product(mm, c_shape, |coords_now| {
            // Which matrix of the activations, as tract's pack would have indexed it.
            let mut flat = mapping.flat_index(coords_now, &batch_strides);
            let mut offset = 0isize;
            for (i, &ax) in batch_axes.iter().enumerate() {
                let stride = batch_strides[i] as usize;
                offset += (flat / stride) as isize * x_strides[ax];
                flat %= stride;
            }
            let packed = &mut scratch.packed.as_bytes_mut()[..size];
            match panels {
                Panels::Plain(format) => {
                    let x_ptr = x_plain.as_slice::<f32>()?.as_ptr();
                    // SAFETY: `packed` holds `format.len(k, mn)` floats; the source is the
                    // matrix at `offset` with its K and M strides, within `x`.
                    unsafe {
                        // As tract: the last panel's padding lanes zeroed (garbage there
                        // may be denormals, which stall the kernel).
                        if mn % format.r != 0 {
                            packed[(mn / format.r) * panel_bytes..].fill(0);
                        }
                        format.pack_t::<f32>(
                            packed.as_mut_ptr().cast(),
                            x_ptr.offset(offset).cast(),
                            mn,
                            x_strides[self.k_axis],
                            x_strides[self.mn_axis],
                            0..k,
                            0..mn,
                        );
                    }
                }
                Panels::I8K4(format) if !self.taps.is_empty() => {
                    self.pack_taps(inputs, mn, format.r, packed)?
                }
                Panels::I8K4(format) => {
                    // Rows of M contiguous (checked when the op was made), K of them.
                    let src = &x_plain.as_slice::<i8>()?[offset as usize..];
                    let row_stride = if k > 1 { x_strides[self.k_axis] as usize } else { mn };
                    crate::int8_pack::pack_rows(src, k, mn, row_stride, format.r, bytemuck_i8(packed));
                }
            }
            let lent = LentPacked { fact, data: packed.as_ptr(), panel_bytes, mn };
            let lent: &dyn MMMInputValue = &lent;
            let mut uops: tract_smallvec::SmallVec<[FusedSpec; 8]> = tract_smallvec::SmallVec::new();
            for op in &mm.micro_ops {
                uops.push(match op {
                    ProtoFusedSpec::AddMatMul { .. } => {
                        let (a, b) = match self.side {
                            Side::A => (lent, operand(b, &geo.c_to_b_axis_mapping, inputs, coords_now)?),
                            Side::B => (operand(a, &geo.c_to_a_axis_mapping, inputs, coords_now)?, lent),
                        };
                        FusedSpec::AddMatMul {
                            a: AsInputValue::Borrowed(a),
                            b: AsInputValue::Borrowed(b),
                            packing,
                        }
                    }
                    // SAFETY: as OptMatMul resolves them, for these output coordinates.
                    op => op.resolve(inputs, coords_now, output, mmm, mode),
                });
            }
            // SAFETY: the operands as the kernel's packing expects (the format is its
            // own), the scratch space made for this kernel.
            unsafe { mmm.run_with_scratch_space(m, n, space, &uops) }
        })
    }
}

impl PackedProduct {
    /// Packs the activation rows the taps name (one matrix: the op was made so).
    fn pack_taps(&self, inputs: &[TValue], mn: usize, r: usize, packed: &mut [u8]) -> TractResult<()> {
        // Every row within its input, checked before packing: the rows are then
        // looked up without a way to fail (an empty row would be packed as zeros).
        for t in &self.taps {
            let len = inputs[t.input].try_as_plain_ram()?.as_slice::<i8>()?.len();
            ensure!(
                t.rows == 0 || t.start + (t.rows - 1) * t.stride + mn <= len,
                "{t:?} of {mn} beyond {:?}",
                inputs[t.input].shape()
            );
        }
        let row = |mut kk: usize| -> &[i8] {
            for t in &self.taps {
                if kk < t.rows {
                    let at = t.start + kk * t.stride;
                    let src = inputs[t.input].try_as_plain_ram().and_then(|v| v.as_slice::<i8>());
                    return src.map_or(&[][..], |s| &s[at..at + mn]);
                }
                kk -= t.rows;
            }
            &[]
        };
        let k = self.taps.iter().map(|t| t.rows).sum();
        crate::int8_pack::pack_rows_with(k, mn, r, bytemuck_i8(packed), row);
        Ok(())
    }
}

/// The int8 products whose activations are a concatenation, along K, of slices along M of
/// other tensors (the int8 model's convolutions over explicit patches, `quantize.py
/// --qlinearconv`: each kernel tap a slice of the padded input's flattened rows, the
/// taps concatenated on the channel axis) read those rows where they lie, in place of
/// the slices and the concatenation: the same matrix, packed the same way, without
/// copying it twice first. These are the largest tensors of the int8 plan (the patches
/// are 9 times the input). Returns how many products take their rows so.
pub fn tapped_products(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let Some((op, inputs)) = tapped_product(model, id)? else { continue };
        crate::fused::replace_node(model, id, "tapped", op, &inputs)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The op for node `id` and its inputs, if it is an int8 product over slices this covers.
fn tapped_product(model: &TypedModel, id: usize) -> TractResult<Option<(PackedProduct, Vec<OutletId>)>> {
    let node = model.node(id);
    let Some(op) = node.op_as::<PackedProduct>() else { return Ok(None) };
    let int8 = op.facts.iter().all(|f| f.format.downcast_ref::<PackedI8K4>().is_some());
    if !int8 || !op.taps.is_empty() {
        return Ok(None);
    }
    // One product of one matrix: every axis but M and N (K and M of the activations) 1.
    let single = |shape: &[usize], keep: [Option<usize>; 2]| {
        shape.iter().enumerate().all(|(ax, &d)| d == 1 || keep.contains(&Some(ax)))
    };
    let Some(c_shape) = op.mm.c_fact.shape.as_concrete() else { return Ok(None) };
    if !single(c_shape, [op.mm.c_m_axis, op.mm.c_n_axis]) {
        return Ok(None);
    }
    let x = node.inputs[op.slot];
    let concat_node = model.node(x.node);
    let Some(concat) = concat_node.op_as::<TypedConcat>() else { return Ok(None) };
    let Some(x_shape) = model.outlet_fact(x)?.shape.as_concrete() else { return Ok(None) };
    let (k_axis, mn_axis) = (op.k_axis, op.mn_axis);
    if concat.axis != k_axis
        || model.outlet_successors(x).len() != 1
        || !single(x_shape, [Some(k_axis), Some(mn_axis)])
    {
        return Ok(None);
    }
    let mn = x_shape[mn_axis];
    let mut inputs = node.inputs.clone();
    let mut taps = tvec![];
    for (j, &part) in concat_node.inputs.iter().enumerate() {
        let slice_node = model.node(part.node);
        let Some(slice) = slice_node.op_as::<Slice>() else { return Ok(None) };
        let (Ok(start), Ok(end)) = (slice.start.to_usize(), slice.end.to_usize()) else { return Ok(None) };
        let source = slice_node.inputs[0];
        let fact = model.outlet_fact(source)?;
        let Some(shape) = fact.shape.as_concrete() else { return Ok(None) };
        // Rows of M contiguous in a source of one matrix, read by the concatenation alone.
        let strides = Tensor::natural_strides(shape);
        if slice.axis != mn_axis
            || end < start
            || end - start != mn
            || fact.datum_type != i8::datum_type()
            || shape.len() != x_shape.len()
            || !single(shape, [Some(k_axis), Some(mn_axis)])
            || (shape[k_axis] > 1 && strides[mn_axis] != 1)
            || model.outlet_successors(part).len() != 1
        {
            return Ok(None);
        }
        // The first source takes the concatenation's place; the others are added.
        let input = if j == 0 {
            inputs[op.slot] = source;
            op.slot
        } else if let Some(i) = inputs.iter().position(|&i| i == source) {
            i
        } else {
            inputs.push(source);
            inputs.len() - 1
        };
        taps.push(Tap { input, start, rows: shape[k_axis], stride: strides[k_axis] as usize });
    }
    if taps.iter().map(|t| t.rows).sum::<usize>() != x_shape[k_axis] {
        return Ok(None);
    }
    Ok(Some((PackedProduct { taps, ..op.clone() }, inputs)))
}

/// tract's product of operands packed elsewhere (by tract's packing nodes, or constant),
/// run as `OptMatMul` runs it, storing into the given tensor (tract's allocates it): the
/// float model's products of `LazyIm2col` patches, and the int8 products on kernels
/// other than the dot-product ones.
impl EvalInto for OptMatMul {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, scratch: &mut Scratch) -> TractResult<()> {
        let output: &Tensor = output;
        let c_shape = output.shape();
        let (m, n, mode, mmm) = kernel(self, c_shape)?;
        let space = space_for(&mut scratch.mmm, mmm);
        each_product(self, c_shape, |coords| {
            // As tract's OptMatMul resolves them (the plan checked the inputs against the
            // op), for these output coordinates.
            let uops: tract_smallvec::SmallVec<[FusedSpec; 8]> =
                self.micro_ops.iter().map(|op| op.resolve(inputs, coords, output, mmm, mode)).collect();
            // SAFETY: the scratch space made for this kernel.
            unsafe { mmm.run_with_scratch_space(m, n, space, &uops) }
        })
    }
}

/// The kernel for `mm`'s output of shape `c_shape`: M, N, the mode and the mode's kernel.
fn kernel<'m>(mm: &'m OptMatMul, c_shape: &[usize]) -> TractResult<(usize, usize, usize, &'m dyn MatMatMul)> {
    ensure!(c_shape.len() <= MAX_RANK, "output {c_shape:?}");
    let m = mm.c_m_axis.map_or(1, |ax| c_shape[ax]);
    let n = mm.c_n_axis.map_or(1, |ax| c_shape[ax]);
    let mode = mm.mode_picker.pick(n)?;
    Ok((m, n, mode, &*mm.mmm[mode]))
}

/// The pool's scratch space that `mmm` can use, made the first time none can (then
/// kept: one per accumulator type).
fn space_for<'s>(
    spaces: &'s mut Vec<Box<dyn ScratchSpace>>,
    mmm: &dyn MatMatMul,
) -> &'s mut dyn ScratchSpace {
    // SAFETY: tract's test of whether the kernel can work in a space, and a space the
    // kernel makes for itself.
    let ix = match spaces.iter().position(|s| unsafe { mmm.can_use_scratch_space(&**s) }) {
        Some(ix) => ix,
        None => {
            spaces.push(unsafe { mmm.allocate_scratch_space() });
            spaces.len() - 1
        }
    };
    &mut *spaces[ix]
}

/// Calls `product` with every coordinate of the output (shape `c_shape`, at most
/// [`MAX_RANK`] axes) but along M and N, last axis fastest: one product each.
fn each_product(
    mm: &OptMatMul,
    c_shape: &[usize],
    mut product: impl FnMut(&[usize]) -> TractResult<()>,
) -> TractResult<()> {
    let rank = c_shape.len();
    let mut looping = [1usize; MAX_RANK];
    looping[..rank].copy_from_slice(c_shape);
    for ax in [mm.c_m_axis, mm.c_n_axis].into_iter().flatten() {
        looping[ax] = 1;
    }
    // An empty axis other than M and N: no product (tract's loop over the coordinates
    // runs none).
    if looping.contains(&0) {
        return Ok(());
    }
    let mut coords = [0usize; MAX_RANK];
    loop {
        product(&coords[..rank])?;
        let mut ax = rank;
        loop {
            if ax == 0 {
                return Ok(());
            }
            ax -= 1;
            coords[ax] += 1;
            if coords[ax] < looping[ax] {
                break;
            }
            coords[ax] = 0;
        }
    }
}

/// The product's other operand for these output coordinates, as `OptMatMul` resolves it.
fn operand<'t>(
    operand: &'t MatMulOperand,
    mapping: &MapOutputAxisToInput,
    inputs: &'t [TValue],
    coords: &[usize],
) -> TractResult<&'t dyn MMMInputValue> {
    match operand {
        MatMulOperand::Const(v) => Ok(&**v),
        MatMulOperand::Input(i) => {
            let storage = inputs[*i].try_storage_as::<PackedMatrixStorage>()?;
            Ok(storage.value_at_flat(mapping.flat_index(coords, storage.batch_strides())))
        }
    }
}

/// Packed activations in a buffer lent for one product: what tract's `EagerPackedInput`
/// is, without owning its memory (the pool's scratch) or its fact (the op's). Made and
/// dropped within [`PackedProduct`]'s evaluation, while both are borrowed there.
#[derive(Clone, Debug)]
struct LentPacked {
    fact: *const PackedExoticFact,
    data: *const u8,
    panel_bytes: usize,
    mn: usize,
}

// SAFETY: read-only pointers to memory that outlives the value (see above); the kernel
// may read it from several threads, none writes it.
unsafe impl Send for LentPacked {}
unsafe impl Sync for LentPacked {}

impl LentPacked {
    fn fact(&self) -> &PackedExoticFact {
        // SAFETY: the op's fact outlives the value (see above).
        unsafe { &*self.fact }
    }
}

impl std::hash::Hash for LentPacked {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.fact as usize, self.data as usize, self.panel_bytes, self.mn).hash(state)
    }
}

impl PartialEq for LentPacked {
    fn eq(&self, other: &Self) -> bool {
        (self.fact, self.data, self.panel_bytes, self.mn)
            == (other.fact, other.data, other.panel_bytes, other.mn)
    }
}
impl Eq for LentPacked {}

impl std::fmt::Display for LentPacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lent {}", self.fact())
    }
}

impl MMMInputValue for LentPacked {
    fn format(&self) -> &dyn MMMInputFormat {
        &*self.fact().format
    }
    fn scratch_panel_buffer_layout(&self) -> Option<std::alloc::Layout> {
        None
    }
    fn panel_bytes(&self, i: usize, _buffer: Option<*mut u8>) -> TractResult<*const u8> {
        // SAFETY: panel `i` of the buffer (the kernel asks for panels below mn / r).
        Ok(unsafe { self.data.add(i * self.panel_bytes) })
    }
    fn mn(&self) -> usize {
        self.mn
    }
    fn k(&self) -> usize {
        self.fact().k
    }
    fn exotic_fact(&self) -> &dyn ExoticFact {
        self.fact()
    }
    fn extract_at_mn_f16(&self, _mn: usize, _slice: &mut [f16]) -> TractResult<()> {
        bail!("lent panels are read by the kernel only")
    }
    fn extract_at_mn_f32(&self, _mn: usize, _slice: &mut [f32]) -> TractResult<()> {
        bail!("lent panels are read by the kernel only")
    }
}

#[cfg(all(test, feature = "onnx"))]
mod tests {
    use super::*;
    use crate::direct_conv::tests::{float_model, values};
    use crate::reuse::{Class, Pool};
    use std::sync::Arc;

    /// The shipped float model as the detector optimises it (Winograd layers included),
    /// with or without its packing done here.
    fn plan(packed_here: bool) -> (Arc<TypedSimplePlan>, usize) {
        let mut model = float_model();
        crate::direct_conv::direct_f32_convolutions(&mut model).unwrap();
        crate::winograd::winograd_f32_convolutions(&mut model).unwrap();
        let mut optimized = model.into_optimized().unwrap();
        let replaced = if packed_here { packed_products(&mut optimized).unwrap() } else { 0 };
        (optimized.into_runnable().unwrap(), replaced)
    }

    /// The same products in the same order: the same bits as tract's plan, run after run,
    /// the pool reusing its tensors from the second run on.
    #[test]
    fn the_float_model_computes_the_same_bits_with_it() {
        let (tracts, _) = plan(false);
        let (ours, replaced) = plan(true);
        // The 16 Winograd layers' batched products and the 1×1 and patch convolutions
        // that tract packs.
        assert!(replaced >= 16, "{replaced} products packed here");
        let n = 416;
        let input = Tensor::from_shape(&[1, 3, n, n], &values(3 * n * n, 3)).unwrap();
        let expected = tracts.run(tvec!(input.clone().into_tvalue())).unwrap();
        // Every class pooled, then a budget that keeps the cheapest per allocation saved.
        let all = Pool::for_plan(&ours, usize::MAX).unwrap();
        let budget = 4 << 20;
        for mut pool in [all, Pool::for_plan(&ours, budget).unwrap()] {
            let mut state = ours.spawn().unwrap();
            let mut sizes = vec![];
            for run in 0..3 {
                let outputs = pool.run(&mut state, tvec!(input.clone().into_tvalue())).unwrap();
                assert_eq!(outputs.len(), expected.len());
                for (i, (a, b)) in outputs.iter().zip(&expected).enumerate() {
                    assert_eq!(a.shape(), b.shape());
                    let (a, b) = (a.try_as_plain_ram().unwrap(), b.try_as_plain_ram().unwrap());
                    let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
                    let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                    assert_eq!(differ, 0, "run {run}, output {i}: {differ} of {} values differ", a.len());
                }
                sizes.push(pool.size());
            }
            assert_eq!(sizes[1], sizes[0], "no tensor added after the first run");
            assert_eq!(sizes[2], sizes[0], "no tensor added after the first run");
            // The plan's liveness says how many tensors of each class the pool makes.
            let kept = pool.kept();
            let made = (kept.iter().map(|c| c.tensors).sum(), kept.iter().map(Class::bytes).sum());
            assert_eq!(sizes[0], made, "{kept:?}");
        }
        let (classes, _) = crate::reuse::classes(&ours).unwrap();
        // Our ops and tract's slices and concatenations.
        let pooled = ours
            .model()
            .nodes()
            .iter()
            .filter(|n| n.op.name().starts_with("Deskcam") || ["Slice", "Concat"].contains(&&*n.op.name()))
            .count();
        // Tensors shared by nodes whose outputs are not alive at once.
        let tensors: usize = classes.iter().map(|c| c.tensors).sum();
        assert!(tensors > 0 && tensors < pooled, "{pooled} nodes' outputs in {classes:?}");
        // (and the reshapes of their outputs)
        assert!(classes.iter().map(|c| c.nodes).sum::<usize>() >= pooled, "{classes:?}");
        // Under the budget: fewer classes, chosen cheapest per allocation saved first; a
        // class left out did not fit beside the cheaper ones kept.
        let kept = Pool::for_plan(&ours, budget).unwrap().kept().to_vec();
        assert!(kept.iter().map(Class::bytes).sum::<usize>() <= budget);
        assert!(!kept.is_empty() && kept.len() < classes.len(), "{kept:?} of {classes:?}");
        let cheaper = |a: &Class, b: &Class| a.bytes() * b.nodes < b.bytes() * a.nodes;
        for c in classes.iter().filter(|c| !kept.contains(c)) {
            let before: usize = kept.iter().filter(|k| cheaper(k, c)).map(Class::bytes).sum();
            assert!(before + c.bytes() > budget, "{c:?} left out of {kept:?}");
        }
    }

    /// The int8 model's products whose activations tract packs for its dot-product
    /// kernels (x86 VNNI, aarch64 SDOT), packed here by int8_pack.rs's packer, those over
    /// explicit patches from the patches' sources: the same bits as tract's plan (run on
    /// the Pi 5's kernels by scripts/vm-vision-test).
    #[test]
    fn the_int8_model_computes_the_same_bits_with_it() {
        let bytes = std::fs::read(deskcam_testkit::repo().join("models/nanodet-int8-qlinear.onnx")).unwrap();
        let tracts = crate::detector::onnx_typed(&bytes).unwrap().into_optimized().unwrap();
        let mut ours = tracts.clone();
        packed_products(&mut ours).unwrap();
        let tapped = tapped_products(&mut ours).unwrap();
        eprintln!("{tapped} int8 products read their patches' rows where they lie");
        let int8 = ours
            .nodes()
            .iter()
            .filter(|n| {
                n.op_as::<PackedProduct>().is_some_and(|op| {
                    ours.outlet_fact(n.inputs[op.slot]).unwrap().datum_type == i8::datum_type()
                })
            })
            .count();
        eprintln!("{int8} int8 products packed here");
        assert!(!crate::int8_pack::tests::has_dot_product_kernel() || (int8 > 0 && tapped > 0));
        let n = 416;
        let input = Tensor::from_shape(&[1, 3, n, n], &values(3 * n * n, 5)).unwrap();
        let expected = tracts.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
        let ours = ours.into_runnable().unwrap();
        let mut state = ours.spawn().unwrap();
        let mut pool = Pool::for_plan(&ours, usize::MAX).unwrap();
        for run in 0..2 {
            let outputs = pool.run(&mut state, tvec!(input.clone().into_tvalue())).unwrap();
            assert_eq!(outputs.len(), expected.len());
            for (i, (a, b)) in outputs.iter().zip(&expected).enumerate() {
                assert!(**a == **b, "run {run}, output {i} differs");
            }
        }
    }
}
