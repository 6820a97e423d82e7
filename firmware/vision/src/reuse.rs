//! Tensors reused from frame to frame instead of allocated per node per run.
//!
//! tract's plan allocates each node's output when the node runs and frees it after its
//! last reader: a few hundred allocations per inference, tens of megabytes. The detector
//! runs its plan through [`Pool::eval`]: a node whose op writes into a tensor it is
//! handed ([`EvalInto`]: ours, the products with their packing (packed_product.rs),
//! tract's products, slices, concatenations, axis moves, constant pads and lookup
//! tables, and reshapes and in-place element-wise ops of pooled values) gets one from
//! the pool, a tensor of the same type and length that nothing outside the pool holds
//! any more; other nodes run as tract runs them. The plan drops a value after its last
//! reader (before that reader runs, so the reader's inputs are the only other holders),
//! so a pooled tensor is free exactly when tract would have freed it. Only plain numbers
//! are pooled (no shapes' symbols, no packed matrices).
//!
//! A pooled tensor is kept between runs, where tract's freed memory serves the next
//! allocation of any size: pooling every size costs the sum over sizes, not the plan's
//! peak (a tract `Tensor` cannot lend a larger buffer to a smaller tensor: its clone
//! copies the whole buffer). So the pool is planned before the first run
//! ([`Pool::for_plan`]): [`classes`] counts, per type and length, how many outputs are
//! alive at once and how many nodes write one, and a byte budget keeps the classes that
//! save the most allocations per byte. The others are allocated per run, as tract does.
//!
//! A reused tensor's contents are the last frame's: an op writes every value of its
//! output.

use std::sync::Arc;

use tract_linalg::mmm::ScratchSpace;
use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::array::{Pad, PadMode, Slice, TypedConcat};
use tract_nnef::tract_core::ops::change_axes::{AxisOp, IntoShape};
use tract_nnef::tract_core::ops::element_wise::ElementWiseOp;
use tract_nnef::tract_core::ops::matmul::optimized::OptMatMul;
use tract_nnef::tract_core::ops::quant::LookupTable;

/// An op that writes its one output into a tensor it is given.
pub trait EvalInto {
    /// Computes the output from `inputs` into `output`, whose type and shape are the
    /// output fact's and whose values are stale; `scratch` is working memory shared by
    /// every node of the plan (one runs at a time).
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, scratch: &mut Scratch) -> TractResult<()>;
}

/// Working memory the pool lends to each node in turn.
#[derive(Default)]
pub struct Scratch {
    /// Floats for an op's own use: contents undefined on entry.
    pub floats: Vec<f32>,
    /// The matrix-product kernels' scratch spaces, one per accumulator type of the plan's
    /// kernels (float and integer ones cannot share one; tract's `OptMatMul` keeps one per
    /// session and makes it anew when the next kernel cannot use it).
    pub mmm: Vec<Box<dyn ScratchSpace>>,
    /// One matrix's packed activations (packed_product.rs).
    pub packed: Blob,
}

impl Scratch {
    /// `len` floats, set to zero.
    pub fn zeroed(&mut self, len: usize) -> &mut [f32] {
        self.floats.clear();
        self.floats.resize(len, 0.0);
        &mut self.floats
    }

    /// `len` floats, values undefined (the last user's).
    pub fn floats(&mut self, len: usize) -> &mut [f32] {
        if self.floats.len() < len {
            self.floats.resize(len, 0.0);
        }
        &mut self.floats[..len]
    }
}

/// tract's slice, copied into the given tensor (tract's allocates it): the int8 model's
/// patches are gathered by some 300 of them.
impl EvalInto for Slice {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, _: &mut Scratch) -> TractResult<()> {
        let (start, end) = (self.start.to_usize()?, self.end.to_usize()?);
        output.assign_slice(.., &inputs[0], start..end, self.axis)
    }
}

/// tract's concatenation, each input copied into its place in the given tensor.
impl EvalInto for TypedConcat {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, _: &mut Scratch) -> TractResult<()> {
        let mut at = 0;
        for input in inputs {
            let n = input.shape()[self.axis];
            output.assign_slice(at..at + n, input, .., self.axis)?;
            at += n;
        }
        ensure!(at == output.shape()[self.axis], "{inputs:?} into {:?}", output.shape());
        Ok(())
    }
}

/// tract's reshape, copied into the given tensor: only where the pool holds its input
/// (see [`classes`]), which tract's would copy too (into a new tensor: the pool's
/// reference makes the input shared); elsewhere tract's moves it.
impl EvalInto for IntoShape {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, _: &mut Scratch) -> TractResult<()> {
        let input = inputs[0].try_as_plain_ram()?.as_bytes();
        let out = output.as_bytes_mut();
        ensure!(input.len() == out.len(), "{:?} into {:?}", inputs[0].shape(), self.dims);
        out.copy_from_slice(input);
        Ok(())
    }
}

/// tract's element-wise ops: its lookup tables (the int8 model's activations, which
/// tract writes into a new tensor), and the ops that work in place, only where the pool
/// holds the input (see [`moves_input`]; tract's would copy it into a new tensor). The
/// input is copied into the given tensor, then the op runs on it in place.
impl EvalInto for ElementWiseOp {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, _: &mut Scratch) -> TractResult<()> {
        let dt = inputs[0].datum_type();
        ensure!(output.datum_type() == dt, "{} from {dt:?} into {:?}", self.0.name(), output.datum_type());
        let input = inputs[0].try_as_plain_ram()?.as_bytes();
        let out = output.as_bytes_mut();
        ensure!(input.len() == out.len(), "{:?} into {:?}", inputs[0].shape(), output.shape());
        if let Some(lut) = self.0.downcast_ref::<LookupTable>() {
            // A table of bytes: i8 values are looked up by their bits, as tract's does;
            // over the cores in chunks, as tract's (one chunk on one thread).
            ensure!(dt.size_of() == 1 && self.0.output_type(dt) == Some(dt), "LookupTable on {dt:?}");
            let len = out.len();
            return tract_linalg::multithread::par_chunks_mut(out, 1, len, |first, chunk| {
                chunk.copy_from_slice(&input[first..first + chunk.len()]);
                lut.table.run(chunk);
                Ok(())
            });
        }
        ensure!(works_in_place(self, dt), "{} is not in place on {dt:?}", self.0.name());
        out.copy_from_slice(input);
        self.0.eval_in_place(output, None)
    }
}

/// tract's axis move, the one [`AxisOp`] that copies (into a new tensor in tract's):
/// the head's transposes.
impl EvalInto for AxisOp {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, _: &mut Scratch) -> TractResult<()> {
        let AxisOp::Move(from, to) = *self else { bail!("{self:?} does not copy") };
        let shape = inputs[0].shape();
        // The input as [outer][p][q][inner] and the output as [outer][q][p][inner]: the
        // moved axis is p (to the right) or q (to the left).
        let (lo, hi) = (from.min(to), from.max(to));
        let split = if from < to { from + 1 } else { from };
        let outer: usize = shape[..lo].iter().product();
        let p: usize = shape[lo..split].iter().product();
        let q: usize = shape[split..=hi].iter().product();
        let item = shape[hi + 1..].iter().product::<usize>() * inputs[0].datum_type().size_of();
        let src = inputs[0].try_as_plain_ram()?.as_bytes();
        let dst = output.as_bytes_mut();
        ensure!(src.len() == dst.len() && src.len() == outer * p * q * item, "{shape:?} {self:?}");
        // The head's moves are of single numbers (4 bytes): a copy of a length known
        // when compiling is a load and a store, a runtime-sized one a call per number.
        match item {
            1 => move_items::<1>(dst, src, outer, p, q, item),
            2 => move_items::<2>(dst, src, outer, p, q, item),
            4 => move_items::<4>(dst, src, outer, p, q, item),
            8 => move_items::<8>(dst, src, outer, p, q, item),
            _ => move_items::<0>(dst, src, outer, p, q, item),
        }
        Ok(())
    }
}

/// `src` as [outer][p][q] items of `item` bytes into `dst` as [outer][q][p]; `N` is
/// `item` when it is known when compiling, else 0.
fn move_items<const N: usize>(dst: &mut [u8], src: &[u8], outer: usize, p: usize, q: usize, item: usize) {
    let item = if N > 0 { N } else { item };
    for o in 0..outer {
        for i in 0..p {
            for m in 0..q {
                let s = ((o * p + i) * q + m) * item;
                let d = ((o * q + m) * p + i) * item;
                dst[d..d + item].copy_from_slice(&src[s..s + item]);
            }
        }
    }
}

/// tract's constant pad (the int8 model's, before its convolutions): the output filled
/// with the value as tract casts it, then the input's rows copied into the interior.
impl EvalInto for Pad {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, _: &mut Scratch) -> TractResult<()> {
        let PadMode::Constant(value) = &self.mode else { bail!("{self:?} is not a constant pad") };
        let input = &inputs[0];
        let size = input.datum_type().size_of();
        // The value's bytes (a number: 8 at most), on the stack: no allocation, but for
        // a value of another type (the cast makes a tensor).
        fn element<T: Datum + Copy>(value: &Tensor) -> TractResult<([u8; 8], usize)> {
            let v = value.cast_to_scalar::<T>()?;
            let n = std::mem::size_of::<T>();
            ensure!(n <= 8, "{value:?} is wider than 8 bytes");
            let mut bytes = [0u8; 8];
            // SAFETY: the bytes of a plain numeric value.
            bytes[..n]
                .copy_from_slice(unsafe { std::slice::from_raw_parts((&v as *const T).cast::<u8>(), n) });
            Ok((bytes, n))
        }
        let (mut bytes, mut n) = ([0u8; 8], size);
        if value.datum_type() == input.datum_type() && value.len() == 1 && size <= 8 {
            // The same type (a quantised one's parameters too): its bytes as they are.
            bytes[..size].copy_from_slice(value.try_as_plain_ram()?.as_bytes());
        } else {
            (bytes, n) = dispatch_numbers!(element(input.datum_type())(value))?;
        }
        let element = &bytes[..n];
        ensure!(n == size, "{value:?} as {:?}", input.datum_type());
        // The whole output filled, then the input's rows copied in: measured on the
        // Cortex-A76, fewer instructions than filling only the border around each row
        // (404 M against 396 M for the int8 model: most of its pads are of grids 52,
        // 26 or 13 wide, short rows, and each row's two fills were calls).
        let out_strides: TVec<usize> = output.strides().iter().map(|&s| s as usize * size).collect();
        let out = output.as_bytes_mut();
        fill(out, element);
        let shape = input.shape();
        let src = input.try_as_plain_ram()?.as_bytes();
        let Some((&last, outer)) = shape.split_last() else {
            out.copy_from_slice(src);
            return Ok(());
        };
        let row = last * size;
        let base: usize = self.pads.iter().zip(&out_strides).map(|(&(before, _), s)| before * s).sum();
        let mut index: TVec<usize> = tvec![0; outer.len()];
        for r in 0..outer.iter().product::<usize>() {
            let at = base + index.iter().zip(&out_strides).map(|(i, s)| i * s).sum::<usize>();
            out[at..at + row].copy_from_slice(&src[r * row..(r + 1) * row]);
            for ax in (0..outer.len()).rev() {
                index[ax] += 1;
                if index[ax] < outer[ax] {
                    break;
                }
                index[ax] = 0;
            }
        }
        Ok(())
    }
}

/// Fills `out` with copies of `element` (`out` a whole number of them). One element
/// at a time, a copy of a runtime-sized element is a call per element: 40 or more
/// instructions per byte of an int8 pad (221 M of the int8 model's 617 M on the
/// Cortex-A76). Bytes are filled as bytes; wider elements by doubling the filled part.
fn fill(out: &mut [u8], element: &[u8]) {
    let size = element.len();
    if size == 0 || out.is_empty() {
        return;
    }
    if element.iter().all(|&b| b == element[0]) {
        out.fill(element[0]);
        return;
    }
    out[..size].copy_from_slice(element);
    let mut filled = size;
    while filled < out.len() {
        let n = filled.min(out.len() - filled);
        out.copy_within(..n, filled);
        filled += n;
    }
}

/// The ops that evaluate into a given tensor; `input` is the type of the node's first
/// input (an element-wise op is ours only where it keeps that type).
fn as_eval_into(node: &TypedNode, input: Option<DatumType>) -> Option<&dyn EvalInto> {
    use crate::{direct_conv, fused, packed_product, winograd};
    let op = node.op.as_op();
    if let Some(op) = op.downcast_ref::<ElementWiseOp>() {
        let ours = (op.1.is_none() && op.0.is::<LookupTable>()) || in_place(node, op, input?);
        return ours.then_some(op as &dyn EvalInto);
    }
    if let Some(op @ AxisOp::Move(..)) = op.downcast_ref::<AxisOp>() {
        return Some(op);
    }
    if let Some(op @ Pad { mode: PadMode::Constant(_), .. }) = op.downcast_ref::<Pad>() {
        return Some(op);
    }
    macro_rules! first_of {
        ($($t:ty),*) => {
            $(if let Some(op) = op.downcast_ref::<$t>() {
                return Some(op);
            })*
        };
    }
    first_of!(
        Slice,
        TypedConcat,
        IntoShape,
        direct_conv::DirectConv3x3,
        fused::GatherSum,
        fused::PaddedMaxPool,
        fused::PaddedConcat,
        winograd::WinogradInput,
        winograd::WinogradOutput,
        packed_product::PackedProduct
    );
    // A product of up to packed_product's rank (tract's here have 3 or 4 axes).
    if let Some(op) = op.downcast_ref::<OptMatMul>() {
        return (op.c_fact.rank() <= packed_product::MAX_RANK).then_some(op as &dyn EvalInto);
    }
    None
}

/// Whether tract's op moves its input into its output when nothing else holds the input
/// (a reshape; an element-wise op in place): such a node is ours only where the pool may
/// hold its input (tract's would copy it then), else tract's moves it, no copy.
fn moves_input(node: &TypedNode, input: Option<DatumType>) -> bool {
    let in_place_op = |op: &ElementWiseOp| input.is_some_and(|dt| in_place(node, op, dt));
    node.op_is::<IntoShape>() || node.op_as::<ElementWiseOp>().is_some_and(in_place_op)
}

/// Whether tract runs this element-wise op on its input's tensor (of type `input`): the
/// output of the same type (a quantisation, say, changes it: tract computes it into a
/// new tensor).
fn in_place(node: &TypedNode, op: &ElementWiseOp, input: DatumType) -> bool {
    works_in_place(op, input) && node.outputs.first().is_some_and(|o| o.fact.datum_type == input)
}

/// Whether tract's element-wise op computes on a tensor of type `dt` in place: no output
/// type of its own, for the op or for that input.
fn works_in_place(op: &ElementWiseOp, dt: DatumType) -> bool {
    op.1.is_none() && op.0.output_type(dt).is_none()
}

/// Evaluates an [`EvalInto`] op outside a pool (tests, constant folding): a fresh output,
/// of the fact the op's `output_facts` gives for these inputs.
pub fn eval_alone<O: EvalInto + TypedOp>(op: &O, inputs: &[TValue]) -> TractResult<TVec<TValue>> {
    let facts: TVec<TypedFact> = inputs.iter().map(|t| TypedFact::shape_and_dt_of(t)).collect();
    let facts: TVec<&TypedFact> = facts.iter().collect();
    let [fact] = &op.output_facts(&facts)?[..] else { bail!("{} has more than one output", op.name()) };
    let shape = fact.shape.as_concrete().with_context(|| format!("{} output {fact:?}", op.name()))?;
    // SAFETY: a plain numeric type (our ops' outputs are floats, the products' floats or
    // int8), every value written by `eval_into`.
    let mut output = unsafe { Tensor::uninitialized_dt(fact.datum_type, shape)? };
    op.eval_into(inputs, &mut output, &mut Scratch::default())?;
    Ok(tvec!(output.into_tvalue()))
}

/// The outputs of one type and length that a plan's pooled ops write: how many are alive
/// at once at most (the tensors a pool keeps for them) and how many nodes write one (the
/// allocations they save per run).
#[derive(Clone, Debug, PartialEq)]
pub struct Class {
    pub datum_type: DatumType,
    pub len: usize,
    pub tensors: usize,
    pub nodes: usize,
}

impl Class {
    /// The bytes a pool keeps for this class.
    pub fn bytes(&self) -> usize {
        self.tensors * self.len * self.datum_type.size_of()
    }
}

/// The classes of `plan`'s outputs that [`EvalInto`] ops write, from the plan's order and
/// each output's last reader: a value is alive from the step that makes it to the step
/// of its last reader (the reader holds it while it runs); the model's outputs to the
/// end of the run and beyond (the caller holds them).
/// Also returns the class of each node's output (see [`keys`]).
pub(crate) fn classes(plan: &TypedSimplePlan) -> TractResult<(Vec<Class>, Vec<Option<Key>>)> {
    let model = plan.model();
    let order = plan.order_without_consts();
    let keys = keys(model, order)?;
    let mut last = vec![None; model.nodes().len()];
    for (step, &n) in order.iter().enumerate() {
        for input in &model.node(n).inputs {
            last[input.node] = Some(step);
        }
    }
    for output in model.output_outlets()? {
        last[output.node] = Some(usize::MAX);
    }
    // Per class, (step, +1) when a value is made and (step after its last reader, -1).
    type Events = Vec<(usize, isize)>;
    let mut events: Vec<(Key, Events)> = vec![];
    for (step, &n) in order.iter().enumerate() {
        let Some(key) = keys[n] else { continue };
        let end = last[n].unwrap_or(step).saturating_add(1);
        match events.iter_mut().find(|(k, _)| *k == key) {
            Some((_, e)) => e.extend([(step, 1), (end, -1)]),
            None => events.push((key, vec![(step, 1), (end, -1)])),
        }
    }
    let classes = events
        .into_iter()
        .map(|((datum_type, len), mut events)| {
            let nodes = events.len() / 2;
            // A tensor let go of at a step is free for the node of that step.
            events.sort();
            let (mut alive, mut tensors) = (0isize, 0isize);
            for (_, delta) in events {
                alive += delta;
                tensors = tensors.max(alive);
            }
            Class { datum_type, len, tensors: tensors as usize, nodes }
        })
        .collect();
    Ok((classes, keys))
}

/// Whether a value of this fact may be written into an uninitialised tensor and copied
/// as bytes: numbers, not symbols or strings, and not a packed matrix.
fn plain_numbers(fact: &TypedFact) -> bool {
    fact.datum_type.is_copy() && fact.datum_type.is_number() && fact.exotic_fact.is_none()
}

/// A class: the output's type and length.
pub(crate) type Key = (DatumType, usize);

/// Per node id, the class of its output if the pool may give it one: an [`EvalInto`] op
/// with one output of a known shape; a reshape or an in-place element-wise op only of a
/// value the pool may hold (else tract's moves it, no copy).
fn keys(model: &TypedModel, order: &[usize]) -> TractResult<Vec<Option<Key>>> {
    let mut keys = vec![None; model.nodes().len()];
    for &n in order {
        let node = model.node(n);
        let input = node.inputs.first().map(|&i| model.outlet_fact(i).map(|f| f.datum_type)).transpose()?;
        let (Some(_), [output]) = (as_eval_into(node, input), &node.outputs[..]) else { continue };
        let Some(shape) = output.fact.shape.as_concrete() else { continue };
        if !plain_numbers(&output.fact) || (moves_input(node, input) && keys[node.inputs[0].node].is_none()) {
            continue;
        }
        keys[n] = Some((output.fact.datum_type, shape.iter().product()));
    }
    Ok(keys)
}

/// The tensors a plan's nodes write into, and their scratch.
pub struct Pool {
    /// The classes whose outputs are pooled: the others are allocated as tract does.
    kept: Vec<Class>,
    /// Per node id, whether its output is pooled.
    pooled: Vec<bool>,
    /// Every tensor the pool made; free when the pool's is the only reference.
    tensors: Vec<Arc<Tensor>>,
    scratch: Scratch,
}

impl Pool {
    /// A pool for `plan` that keeps at most `budget` bytes of tensors: the classes that
    /// save the most allocations per byte kept, first. A pooled tensor is kept between
    /// runs, where tract would give its memory back to be reused for another size: all
    /// of them cost the device tens of megabytes (issue 4: peak RSS).
    pub fn for_plan(plan: &TypedSimplePlan, budget: usize) -> TractResult<Pool> {
        let (mut classes, keys) = classes(plan)?;
        classes.sort_by(|a, b| (a.bytes() * b.nodes).cmp(&(b.bytes() * a.nodes)).then(a.len.cmp(&b.len)));
        let mut kept = vec![];
        let mut total = 0usize;
        for class in classes {
            if total + class.bytes() <= budget {
                total += class.bytes();
                kept.push(class);
            }
        }
        let pooled = keys
            .iter()
            .map(|key| key.is_some_and(|(dt, len)| kept.iter().any(|c| c.datum_type == dt && c.len == len)))
            .collect();
        Ok(Pool { kept, pooled, tensors: vec![], scratch: Scratch::default() })
    }

    /// The classes this pool keeps.
    pub fn kept(&self) -> &[Class] {
        &self.kept
    }

    /// Runs `state`'s plan on `inputs` with [`Pool::eval`].
    pub fn run(&mut self, state: &mut TypedSimpleState, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        state.run_plan_with_eval(inputs, |ctx, st, node, inputs| self.eval(ctx, st, node, inputs))
    }

    /// Runs one node of a plan: into a pooled tensor when its op is an [`EvalInto`] with
    /// one output of a known shape, else as tract's plan does. The `eval` of
    /// `SimpleState::run_plan_with_eval`.
    pub fn eval(
        &mut self,
        ctx: &EvalContext,
        state: Option<&mut (dyn OpState + 'static)>,
        node: &TypedNode,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let input = inputs.first().map(|i| i.datum_type());
        if let (Some(op), [output]) = (as_eval_into(node, input), &node.outputs[..]) {
            let pooled = self.pooled.get(node.id).copied().unwrap_or(false);
            let ours = pooled || (plain_numbers(&output.fact) && !moves_input(node, input));
            if let Some(shape) = output.fact.shape.as_concrete().filter(|_| ours) {
                if pooled {
                    let ix = self.take(output.fact.datum_type, shape)?;
                    let target = Arc::get_mut(&mut self.tensors[ix]).context("a pooled tensor is shared")?;
                    op.eval_into(&inputs, target, &mut self.scratch)
                        .with_context(|| format!("Evaluating {node}"))?;
                    return Ok(tvec!(self.tensors[ix].clone().into_tvalue()));
                }
                // SAFETY: a plain numeric type; the op writes every value.
                let mut tensor = unsafe { Tensor::uninitialized_dt(output.fact.datum_type, shape)? };
                op.eval_into(&inputs, &mut tensor, &mut self.scratch)
                    .with_context(|| format!("Evaluating {node}"))?;
                return Ok(tvec!(tensor.into_tvalue()));
            }
        }
        tract_nnef::tract_core::plan::eval(ctx, state, node, inputs)
    }

    /// The index of a pooled tensor of this type and shape that nothing else holds: a free
    /// one of the same length reshaped, or a new one. The tensors keep their places, so
    /// from the second run on every node gets the same one each run.
    fn take(&mut self, datum_type: DatumType, shape: &[usize]) -> TractResult<usize> {
        let len: usize = shape.iter().product();
        let free = |t: &Arc<Tensor>| {
            Arc::strong_count(t) == 1
                && Arc::weak_count(t) == 0
                && t.datum_type() == datum_type
                && t.len() == len
        };
        // One of this very shape first: a reshape to more than 4 axes allocates (the
        // shape and strides leave their inline storage).
        let found = (self.tensors.iter().position(|t| free(t) && t.shape() == shape))
            .or_else(|| self.tensors.iter().position(free));
        let Some(ix) = found else {
            // SAFETY: a plain numeric type; the op writes every value before anyone reads.
            self.tensors.push(Arc::new(unsafe { Tensor::uninitialized_dt(datum_type, shape)? }));
            return Ok(self.tensors.len() - 1);
        };
        let t = Arc::get_mut(&mut self.tensors[ix]).context("a free tensor is shared")?;
        if t.shape() != shape {
            t.set_shape(shape)?;
        }
        Ok(ix)
    }

    /// How many tensors the pool holds, and their bytes.
    #[cfg(test)]
    pub fn size(&self) -> (usize, usize) {
        (self.tensors.len(), self.tensors.iter().map(|t| t.len() * t.datum_type().size_of()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Constant pads of floats and int8 on every axis, some sides zero: tract's values.
    #[test]
    fn constant_pads_as_tracts() {
        type Case = (&'static [usize], Vec<(usize, usize)>);
        let cases: [Case; 3] = [
            (&[1, 3, 4, 5], vec![(0, 0), (0, 0), (1, 2), (2, 1)]),
            (&[2, 3], vec![(1, 0), (0, 3)]),
            (&[4], vec![(2, 1)]),
        ];
        for (shape, pads) in cases {
            let len = shape.iter().product::<usize>();
            for (input, value) in [
                (
                    Tensor::from_shape(shape, &(0..len).map(|i| i as f32).collect::<Vec<_>>()).unwrap(),
                    tensor0(-1.5f32),
                ),
                (
                    Tensor::from_shape(shape, &(0..len).map(|i| i as i8).collect::<Vec<_>>()).unwrap(),
                    tensor0(-3i8),
                ),
            ] {
                let op = Pad { pads: pads.clone(), mode: PadMode::Constant(value.into_arc_tensor()) };
                let input = input.into_tvalue();
                let expected = op.eval(&EvalContext::out_of_plan(), tvec!(input.clone())).unwrap().remove(0);
                let mut output = Tensor::zero_dt(input.datum_type(), expected.shape()).unwrap();
                op.eval_into(std::slice::from_ref(&input), &mut output, &mut Scratch::default()).unwrap();
                assert_eq!(output, *expected, "{shape:?} {pads:?}");
            }
        }
    }

    /// A lookup table on int8 and one on bytes, and an element-wise op in place: the
    /// same values as tract's, from a stale output.
    #[test]
    fn element_wise_as_tracts() {
        use tract_nnef::tract_core::ops::{math, quant};
        let table: Vec<u8> = (0..=255u8).map(|b| b.wrapping_mul(7).wrapping_add(3)).collect();
        let lut = || quant::lookup_table(tract_linalg::routines::lut_u8(&table).unwrap());
        let bytes: Vec<u8> = (0..300).map(|i| (i * 37 % 256) as u8).collect();
        let signed: Vec<i8> = bytes.iter().map(|&b| b as i8).collect();
        let floats: Vec<f32> = (0..300).map(|i| i as f32 * 0.25 - 30.0).collect();
        let cases = [
            (lut(), Tensor::from_shape(&[3, 100], &signed).unwrap()),
            (lut(), Tensor::from_shape(&[1, 300], &bytes).unwrap()),
            (math::abs(), Tensor::from_shape(&[2, 150], &floats).unwrap()),
        ];
        for (op, input) in cases {
            let input = input.into_tvalue();
            let expected = op.eval(&EvalContext::out_of_plan(), tvec!(input.clone())).unwrap().remove(0);
            assert_ne!(*expected, *input, "{op:?} changes its input");
            let mut output = Tensor::zero_dt(input.datum_type(), input.shape()).unwrap();
            op.eval_into(std::slice::from_ref(&input), &mut output, &mut Scratch::default()).unwrap();
            assert_eq!(output, *expected, "{op:?}");
        }
    }

    /// A plan of element-wise ops, one of which changes the type (a quantisation: tract
    /// writes a new tensor), runs through a pool as through tract's plan; the one that
    /// keeps its type (abs, after a reshape the pool holds) is the pool's, the other not.
    #[test]
    fn element_wise_ops_that_change_the_type_stay_tracts() {
        use tract_nnef::tract_core::ops::{math, quant};
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, 6])).unwrap();
        let t = model.wire_node("t", AxisOp::Move(0, 1), &[x]).unwrap();
        let a = model.wire_node("abs", math::abs(), &t).unwrap();
        let q = model.wire_node("q", quant::quantize_linear_u8(0.5, 10), &a).unwrap();
        model.select_output_outlets(&q).unwrap();
        let plan = TypedSimplePlan::new(model).unwrap();
        let (_, keys) = classes(&plan).unwrap();
        let id = |name: &str| plan.model().node_by_name(name).unwrap().id;
        assert!(keys[id("abs")].is_some() && keys[id("q")].is_none(), "{keys:?}");
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 1.5 - 7.0).collect();
        let input = Tensor::from_shape(&[2, 6], &values).unwrap().into_tvalue();
        let expected = plan.run(tvec!(input.clone())).unwrap();
        let mut pool = Pool::for_plan(&plan, 1 << 20).unwrap();
        let mut state = plan.spawn().unwrap();
        for _ in 0..2 {
            let got = pool.run(&mut state, tvec!(input.clone())).unwrap();
            assert_eq!(got[0], expected[0]);
        }
    }

    /// Every move of every axis of a 4-d tensor (and a 5-d one's outer axes), of floats
    /// and of bytes (items of 1, 2, 4, 8 bytes and other sizes): the same values as
    /// tract's.
    #[test]
    fn axis_moves_as_tracts() {
        for shape in [&[2usize, 3, 4, 5][..], &[1, 4, 3, 2, 2]] {
            let len = shape.iter().product::<usize>();
            let floats: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let bytes: Vec<i8> = (0..len).map(|i| i as i8).collect();
            for input in
                [Tensor::from_shape(shape, &floats).unwrap(), Tensor::from_shape(shape, &bytes).unwrap()]
            {
                let input = input.into_tvalue();
                for (from, to) in (0..shape.len()).flat_map(|f| (0..shape.len()).map(move |t| (f, t))) {
                    let op = AxisOp::Move(from, to);
                    let mut expected = input.clone().into_tensor();
                    op.change_tensor(&mut expected, false).unwrap();
                    let mut output = Tensor::zero_dt(input.datum_type(), expected.shape()).unwrap();
                    op.eval_into(std::slice::from_ref(&input), &mut output, &mut Scratch::default()).unwrap();
                    assert_eq!(output, expected, "{shape:?} {op:?}");
                }
            }
        }
    }

    /// Elements of 1 to 8 bytes, uniform and not, into 0 to 17 of them: the same bytes
    /// as copying the element into each place.
    #[test]
    fn fill_writes_every_element() {
        for element in [&[7u8][..], &[1, 2], &[0, 0, 0, 0], &[1, 2, 3, 4], &[9, 8, 7, 6, 5, 4, 3, 2]] {
            for count in 0..=17 {
                let mut out = vec![0xaau8; count * element.len()];
                fill(&mut out, element);
                let expected: Vec<u8> = element.iter().copied().cycle().take(out.len()).collect();
                assert_eq!(out, expected, "{element:?} × {count}");
            }
        }
    }
}
