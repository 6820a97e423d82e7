//! Tensors reused from frame to frame instead of allocated per node per run.
//!
//! tract's plan allocates each node's output when the node runs and frees it after its
//! last reader: a few hundred allocations per inference, tens of megabytes. The detector
//! runs its plan through [`Pool::eval`]: a node whose op writes into a tensor it is
//! handed ([`EvalInto`]: ours, and the float products with their packing,
//! packed_product.rs) gets one from the pool, a
//! tensor of the same type and length that nothing outside the pool holds any more;
//! other nodes run as tract runs them. The plan drops a value after its last reader
//! (before that reader runs, so the reader's inputs are the only other holders), so a
//! pooled tensor is free exactly when tract would have freed it: the pool grows to the
//! largest set of tensors of one length alive at once and then allocates nothing.
//!
//! A reused tensor's contents are the last frame's: an op writes every value of its
//! output.

use std::sync::Arc;

use tract_linalg::mmm::ScratchSpace;
use tract_nnef::internal::*;

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
    /// The matrix-product kernels' scratch space (tract's `OptMatMul` keeps one per
    /// session too).
    pub mmm: Option<Box<dyn ScratchSpace>>,
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

/// The ops that evaluate into a given tensor.
fn as_eval_into(op: &dyn TypedOp) -> Option<&dyn EvalInto> {
    use crate::{direct_conv, fused, packed_product, winograd};
    let op = op.as_op();
    macro_rules! first_of {
        ($($t:ty),*) => {
            $(if let Some(op) = op.downcast_ref::<$t>() {
                return Some(op);
            })*
        };
    }
    first_of!(
        direct_conv::DirectConv3x3,
        fused::GatherSum,
        fused::PaddedMaxPool,
        fused::PaddedConcat,
        winograd::WinogradInput,
        winograd::WinogradOutput,
        packed_product::PackedProduct
    );
    None
}

/// Evaluates an [`EvalInto`] op outside a pool (tests, constant folding): a fresh output,
/// of the fact the op's `output_facts` gives for these inputs.
pub fn eval_alone<O: EvalInto + TypedOp>(op: &O, inputs: &[TValue]) -> TractResult<TVec<TValue>> {
    let facts: TVec<TypedFact> = inputs.iter().map(|t| TypedFact::shape_and_dt_of(t)).collect();
    let facts: TVec<&TypedFact> = facts.iter().collect();
    let [fact] = &op.output_facts(&facts)?[..] else { bail!("{} has more than one output", op.name()) };
    let shape = fact.shape.as_concrete().with_context(|| format!("{} output {fact:?}", op.name()))?;
    // SAFETY: a plain numeric type (our ops' outputs are floats), every value written by
    // `eval_into`.
    let mut output = unsafe { Tensor::uninitialized_dt(fact.datum_type, shape)? };
    op.eval_into(inputs, &mut output, &mut Scratch::default())?;
    Ok(tvec!(output.into_tvalue()))
}

/// The tensors a plan's nodes write into, and their scratch.
#[derive(Default)]
pub struct Pool {
    /// Every tensor the pool made; free when the pool's is the only reference.
    tensors: Vec<Arc<Tensor>>,
    scratch: Scratch,
}

impl Pool {
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
        if let (Some(op), [output]) = (as_eval_into(node.op.as_ref()), &node.outputs[..]) {
            if let Some(shape) = output.fact.shape.as_concrete() {
                let mut tensor = self.take(output.fact.datum_type, shape)?;
                let target = Arc::get_mut(&mut tensor).context("a pooled tensor is shared")?;
                op.eval_into(&inputs, target, &mut self.scratch)
                    .with_context(|| format!("Evaluating {node}"))?;
                self.tensors.push(tensor.clone());
                return Ok(tvec!(tensor.into_tvalue()));
            }
        }
        tract_nnef::tract_core::plan::eval(ctx, state, node, inputs)
    }

    /// A tensor of this type and shape that nothing else holds, out of the pool (the
    /// caller puts a reference back): a free one of the same length reshaped, or a new one.
    fn take(&mut self, datum_type: DatumType, shape: &[usize]) -> TractResult<Arc<Tensor>> {
        let len: usize = shape.iter().product();
        let free = self.tensors.iter().position(|t| {
            Arc::strong_count(t) == 1
                && Arc::weak_count(t) == 0
                && t.datum_type() == datum_type
                && t.len() == len
        });
        let Some(ix) = free else {
            // SAFETY: a plain numeric type; the op writes every value before anyone reads.
            return Ok(Arc::new(unsafe { Tensor::uninitialized_dt(datum_type, shape)? }));
        };
        let mut tensor = self.tensors.swap_remove(ix);
        let t = Arc::get_mut(&mut tensor).context("a free tensor is shared")?;
        if t.shape() != shape {
            t.set_shape(shape)?;
        }
        Ok(tensor)
    }

    /// How many tensors the pool holds, and their bytes.
    #[cfg(test)]
    pub fn size(&self) -> (usize, usize) {
        (self.tensors.len(), self.tensors.iter().map(|t| t.len() * t.datum_type().size_of()).sum())
    }
}
