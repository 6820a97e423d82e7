//! One pass each for two chains of small ops that the model's graph rewrites
//! (`models/graph_rewrites.py`) leave in the float model, put into the model in place of
//! the chains before it is optimised.
//!
//! - The bilinear resizes, each a sum of four `weight · X[rows][cols]` terms written as
//!   Gathers, Muls and Adds so that tract does not work out every output's sources as it
//!   goes: tract runs them as 13 nodes per resize, each writing a tensor of the output's
//!   size. [`GatherSum`] reads the input once and writes the output once, with the same
//!   products and sums in the same order, so the values are the same to the last bit.
//! - The max-pool, a `Pad` with -∞, a pool at stride 1 across and a `Downsample` keeping
//!   every other column: three passes over 32 planes of 208×208 (the padded copy alone
//!   was 1.4 ms of a 61 ms inference on x86). [`PaddedMaxPool`] takes each output from
//!   the input where it lies; a maximum is one of its values, so these are the same too
//!   (but for the sign of a zero maximum, see its `eval`).
//!
//! - In the optimised plan, the zero `Pad` tract puts before a convolution it computes
//!   from patches (the three at stride 2 with 64–256 channels), with the `Concat` that
//!   alone feeds it: tract's Concat copies its inputs into one tensor and its Pad fills
//!   a new one and copies that in through a general strided assignment. [`PaddedConcat`]
//!   copies each input's rows once into the padded output.
//!
//! `deskcam bench --profile`, x86, before: the resizes' 24 Gathers, 16 Muls and 4 Adds
//! 3.6–4.0 ms, the max-pool's three nodes 2.6–3.1 ms, the three Pads 1.0 ms
//! (MODEL_CARD.md).

use std::collections::HashSet;
use std::sync::Arc;

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::array::{Gather, Pad, PadMode, TypedConcat};
use tract_nnef::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_nnef::tract_core::ops::cnn::{MaxPool, PaddingSpec};
use tract_nnef::tract_core::ops::math::{Add, Mul};
use tract_nnef::tract_core::ops::nn::DataFormat;
use tract_nnef::tract_core::ops::Downsample;

use crate::direct_conv::bytemuck_f32;
use crate::reuse::{eval_alone, EvalInto, Scratch};

/// Replaces each chain this module covers in the (decluttered) model. Returns how many
/// resizes and how many max-pools it replaced.
pub fn fuse_chains(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let sums = gather_sums(model)?;
    let pools = padded_max_pools(model)?;
    if sums + pools > 0 {
        model.compact()?;
    }
    Ok((sums, pools))
}

/// `[1, c, h, w]` floats, concrete, or None.
fn image_shape(model: &TypedModel, outlet: OutletId) -> TractResult<Option<[usize; 4]>> {
    let fact = model.outlet_fact(outlet)?;
    let shape = fact.shape.as_concrete().and_then(|s| <[usize; 4]>::try_from(s).ok());
    Ok(shape.filter(|s| fact.datum_type == f32::datum_type() && s[0] == 1 && !s.contains(&0)))
}

/// Whether every reader of `node`'s outputs is in `within` and none is a model output:
/// the chain may go without it being computed.
fn only_read_within(model: &TypedModel, node: usize, within: &HashSet<usize>) -> TractResult<bool> {
    let outputs = model.output_outlets()?;
    Ok(model.node(node).outputs.iter().enumerate().all(|(slot, o)| {
        !outputs.contains(&OutletId::new(node, slot)) && o.successors.iter().all(|s| within.contains(&s.node))
    }))
}

/// The binary op of a node, if it is a float `TypedBinOp` of mini-op `T`.
fn bin_op<T: BinMiniOp>(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<T>())
}

/// A constant's values as indices into an axis of `len` (negative ones count from the
/// end, as Gather's do), or None when one is out of range.
fn indices(model: &TypedModel, outlet: OutletId, len: usize) -> TractResult<Option<Vec<usize>>> {
    let Some(k) = model.outlet_fact(outlet)?.konst.clone() else { return Ok(None) };
    if k.rank() != 1 || !k.datum_type().is_integer() {
        return Ok(None);
    }
    let k = k.cast_to::<i64>()?;
    let k = k.try_as_plain_ram()?;
    Ok(k.as_slice::<i64>()?
        .iter()
        .map(|&i| {
            let i = if i < 0 { i + len as i64 } else { i };
            (0..len as i64).contains(&i).then_some(i as usize)
        })
        .collect())
}

/// Runs `f` on each channel's plane of `[1, c, h, w]` floats and of the output
/// `[1, c, oh, ow]`.
fn per_channel(
    inputs: &[TValue],
    output: &mut Tensor,
    [c, h, w]: [usize; 3],
    [oh, ow]: [usize; 2],
    mut f: impl FnMut(&[f32], &mut [f32]),
) -> TractResult<()> {
    let input = &inputs[0];
    ensure!(input.shape() == [1, c, h, w], "input {:?} for [1, {c}, {h}, {w}]", input.shape());
    ensure!(output.shape() == [1, c, oh, ow], "output {:?} for [1, {c}, {oh}, {ow}]", output.shape());
    let input = input.try_as_plain_ram()?;
    let x = input.as_slice::<f32>()?;
    let mut plain = output.try_as_plain_ram_mut()?;
    let out = plain.as_slice_mut::<f32>()?;
    for (image, out) in x.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
        f(image, out);
    }
    Ok(())
}

/// Padding before and after, down and across.
type HwPads = [(usize, usize); 2];

/// A `Pad` of a rank-4 tensor's height and width alone with one float: the value and
/// the pads, or None.
fn image_pad(node: &TypedNode) -> TractResult<Option<(f32, HwPads)>> {
    let Some(pad) = node.op_as::<Pad>() else { return Ok(None) };
    let PadMode::Constant(value) = &pad.mode else { return Ok(None) };
    if value.datum_type() != f32::datum_type()
        || value.len() != 1
        || pad.pads.len() != 4
        || pad.pads[..2] != [(0, 0), (0, 0)]
    {
        return Ok(None);
    }
    Ok(Some((value.cast_to_scalar::<f32>()?, [pad.pads[2], pad.pads[3]])))
}

/// One term of a [`GatherSum`]: `weight · X[.., rows, cols]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Term {
    /// Which of the op's column sets.
    cols: usize,
    rows: Vec<usize>,
    /// `[oh, ow]`, their bits.
    weight: Arc<Vec<u32>>,
}

/// A term as found in the model, before its column set is numbered.
struct FoundTerm {
    x: OutletId,
    cols: Vec<usize>,
    rows: Vec<usize>,
    weight: Vec<f32>,
    nodes: [usize; 3],
}

/// `Mul(Gather(Gather(X, cols, axis 3), rows, axis 2), weight)`, the weight a constant
/// `[1, 1, oh, ow]` (either operand).
fn term(model: &TypedModel, outlet: OutletId) -> TractResult<Option<FoundTerm>> {
    let mul = model.node(outlet.node);
    if !bin_op::<Mul>(mul) || mul.inputs.len() != 2 {
        return Ok(None);
    }
    for (g, w) in [(0, 1), (1, 0)] {
        let Some(weight) = model.outlet_fact(mul.inputs[w])?.konst.clone() else { continue };
        let by_rows = model.node(mul.inputs[g].node);
        let Some(Gather { axis: 2, .. }) = by_rows.op_as::<Gather>() else { continue };
        let by_cols = model.node(by_rows.inputs[0].node);
        let Some(Gather { axis: 3, .. }) = by_cols.op_as::<Gather>() else { continue };
        let x = by_cols.inputs[0];
        let Some([_, _, h, w]) = image_shape(model, x)? else { continue };
        let (Some(cols), Some(rows)) =
            (indices(model, by_cols.inputs[1], w)?, indices(model, by_rows.inputs[1], h)?)
        else {
            continue;
        };
        if rows.is_empty()
            || cols.is_empty()
            || weight.datum_type() != f32::datum_type()
            || weight.shape() != [1, 1, rows.len(), cols.len()]
        {
            continue;
        }
        let weight = weight.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        return Ok(Some(FoundTerm { x, cols, rows, weight, nodes: [mul.id, by_rows.id, by_cols.id] }));
    }
    Ok(None)
}

/// The terms of `Add(Add(t1, t2), t3)…` from the left, with the Adds, when every leaf is
/// a [`term`]. Only a chain nested on the left (as `graph_rewrites.py` writes it): the
/// op sums from the left, and another nesting rounds otherwise.
fn terms(
    model: &TypedModel,
    outlet: OutletId,
    found: &mut Vec<FoundTerm>,
    adds: &mut Vec<usize>,
) -> TractResult<bool> {
    let node = model.node(outlet.node);
    if bin_op::<Add>(node) && node.inputs.len() == 2 {
        adds.push(node.id);
        let Some(last) = term(model, node.inputs[1])? else { return Ok(false) };
        let sum = terms(model, node.inputs[0], found, adds)?;
        found.push(last);
        return Ok(sum);
    }
    Ok(match term(model, outlet)? {
        Some(t) => {
            found.push(t);
            true
        }
        None => false,
    })
}

fn gather_sums(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    let mut taken = HashSet::new();
    // From the last node back, so that a chain is met at its last Add first.
    let adds: Vec<usize> = model.nodes().iter().rev().filter(|n| bin_op::<Add>(n)).map(|n| n.id).collect();
    for root in adds {
        if taken.contains(&root) {
            continue;
        }
        let (mut found, mut nodes) = (vec![], vec![]);
        if !terms(model, OutletId::new(root, 0), &mut found, &mut nodes)? || found.len() < 2 {
            continue;
        }
        let x = found[0].x;
        let (oh, ow) = (found[0].rows.len(), found[0].cols.len());
        if found.iter().any(|t| t.x != x || t.rows.len() != oh || t.cols.len() != ow) {
            continue;
        }
        let Some([_, c, h, w]) = image_shape(model, x)? else { continue };
        if image_shape(model, OutletId::new(root, 0))? != Some([1, c, oh, ow]) {
            continue;
        }
        nodes.extend(found.iter().flat_map(|t| t.nodes));
        let within: HashSet<usize> = nodes.iter().copied().collect();
        let inner = within.iter().filter(|&&n| n != root);
        if !inner
            .map(|&n| only_read_within(model, n, &within))
            .collect::<TractResult<Vec<_>>>()?
            .iter()
            .all(|&b| b)
        {
            continue;
        }
        let mut col_sets: Vec<Vec<usize>> = vec![];
        let mut op_terms = vec![];
        for t in found {
            let cols = col_sets.iter().position(|s| *s == t.cols).unwrap_or_else(|| {
                col_sets.push(t.cols.clone());
                col_sets.len() - 1
            });
            let weight = Arc::new(t.weight.into_iter().map(f32::to_bits).collect());
            op_terms.push(Term { cols, rows: t.rows, weight });
        }
        let op = GatherSum { c, h, w, oh, ow, col_sets, terms: op_terms };
        replace_node(model, root, "gather-sum", op, &[x])?;
        taken.extend(within);
        replaced += 1;
    }
    Ok(replaced)
}

/// `Σ weight_k · X[.., rows_k, cols_k]` over `[1, c, h, w]` floats, summed from the left
/// as separate products and sums (no fused multiply-add): what the Gathers, Muls and
/// Adds it replaces compute.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatherSum {
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    /// The distinct column indices of the terms (a bilinear resize has two).
    col_sets: Vec<Vec<usize>>,
    terms: Vec<Term>,
}

impl Op for GatherSum {
    fn name(&self) -> StaticName {
        "DeskcamGatherSum".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let GatherSum { c, h, w, oh, ow, .. } = self;
        Ok(vec![format!("{} terms, {c} channels, {h}×{w} → {oh}×{ow}", self.terms.len())])
    }

    op_as_typed_op!();
}

impl EvalOp for GatherSum {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_alone(self, &inputs)
    }
}

impl EvalInto for GatherSum {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, scratch: &mut Scratch) -> TractResult<()> {
        let GatherSum { c, h, w, oh, ow, .. } = *self;
        // Each column set's gather of one channel's rows, `[h, ow]`, so that the terms
        // are row by row products of contiguous values.
        let gathered = scratch.floats(self.col_sets.len() * h * ow);
        per_channel(inputs, output, [c, h, w], [oh, ow], |image, out| {
            for (cols, g) in self.col_sets.iter().zip(gathered.chunks_exact_mut(h * ow)) {
                for (row, g) in image.chunks_exact(w).zip(g.chunks_exact_mut(ow)) {
                    for (g, &col) in g.iter_mut().zip(cols) {
                        *g = row[col];
                    }
                }
            }
            for (k, t) in self.terms.iter().enumerate() {
                let g = &gathered[t.cols * h * ow..][..h * ow];
                let weight = bytemuck_f32(&t.weight);
                for ((o, &y), wt) in out.chunks_exact_mut(ow).zip(&t.rows).zip(weight.chunks_exact(ow)) {
                    let src = &g[y * ow..][..ow];
                    if k == 0 {
                        o.iter_mut().zip(src).zip(wt).for_each(|((o, s), wt)| *o = s * wt);
                    } else {
                        o.iter_mut().zip(src).zip(wt).for_each(|((o, s), wt)| *o += s * wt);
                    }
                }
            }
        })
    }
}

impl TypedOp for GatherSum {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let GatherSum { c, h, w, oh, ow, .. } = *self;
        ensure!(inputs.len() == 1 && inputs[0].shape.as_concrete() == Some(&[1, c, h, w][..]));
        Ok(tvec!(f32::fact([1, c, oh, ow])))
    }

    as_op!();
}

/// `MaxPool(Pad(X, -∞))`, NCHW, no dilation, the pool's own padding none, then possibly
/// a `Downsample` of its columns.
fn padded_max_pools(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    let pools: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<MaxPool>()).map(|n| n.id).collect();
    for id in pools {
        let node = model.node(id);
        let Some(pool) = node.op_as::<MaxPool>() else { continue };
        let spec = &pool.pool_spec;
        let pad_node = model.node(node.inputs[0].node);
        let Some((value, [(pt, pb), (pl, pr)])) = image_pad(pad_node)? else { continue };
        let x = pad_node.inputs[0];
        let Some([_, c, h, w]) = image_shape(model, x)? else { continue };
        if value != f32::NEG_INFINITY
            || pool.with_index_outputs.is_some()
            || spec.data_format != DataFormat::NCHW
            || spec.kernel_shape.len() != 2
            || !matches!(spec.padding, PaddingSpec::Valid)
            || (0..2).any(|a| spec.dilation(a) != 1)
        {
            continue;
        }
        let (kh, kw, sh, mut sw) =
            (spec.kernel_shape[0], spec.kernel_shape[1], spec.stride(0), spec.stride(1));
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        if kh == 0 || kw == 0 || kh > hp || kw > wp || sh == 0 || sw == 0 {
            continue;
        }
        // The Downsample that alone reads the pool's columns, if any, goes in with it.
        let mut last = id;
        if let [one] = &node.outputs[0].successors[..] {
            if let Some(d) = model.node(one.node).op_as::<Downsample>() {
                if d.axis == 3 && d.stride > 0 && d.modulo == 0 {
                    sw *= d.stride as usize;
                    last = one.node;
                }
            }
        }
        let (oh, ow) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
        let within: HashSet<usize> = [pad_node.id, id, last].into();
        if image_shape(model, OutletId::new(last, 0))? != Some([1, c, oh, ow])
            || !only_read_within(model, pad_node.id, &within)?
            || (last != id && !only_read_within(model, id, &within)?)
        {
            continue;
        }
        let op =
            PaddedMaxPool { c, h, w, kernel: (kh, kw), strides: (sh, sw), before: (pt, pl), out: (oh, ow) };
        let mut patch = TypedModelPatch::new("deskcam-padded-max-pool");
        let tapped = patch.tap_model(model, x)?;
        let out = patch.wire_node(format!("{}.padded", node.name), op, &[tapped])?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// A max-pool of `[1, c, h, w]` floats as if padded with -∞ (`before` rows and columns
/// at the top and left, enough at the bottom and right for `out`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PaddedMaxPool {
    c: usize,
    h: usize,
    w: usize,
    kernel: (usize, usize),
    strides: (usize, usize),
    before: (usize, usize),
    out: (usize, usize),
}

impl Op for PaddedMaxPool {
    fn name(&self) -> StaticName {
        "DeskcamPaddedMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let PaddedMaxPool { c, h, w, kernel, strides, out, .. } = self;
        Ok(vec![format!(
            "{}×{} at stride {}×{}, {c} channels, {h}×{w} → {}×{}",
            kernel.0, kernel.1, strides.0, strides.1, out.0, out.1
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PaddedMaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_alone(self, &inputs)
    }
}

impl EvalInto for PaddedMaxPool {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, scratch: &mut Scratch) -> TractResult<()> {
        let PaddedMaxPool { c, h, w, kernel: (kh, kw), strides: (sh, sw), before: (pt, pl), out: (oh, ow) } =
            *self;
        // One padded row: the maximum down the kernel's rows, -∞ where they are padding.
        let width = (ow - 1) * sw + kw;
        let down = scratch.floats(width.max(pl + w));
        down.fill(f32::NEG_INFINITY);
        per_channel(inputs, output, [c, h, w], [oh, ow], |image, out| {
            for (oy, out) in out.chunks_exact_mut(ow).enumerate() {
                let real = &mut down[pl..pl + w];
                real.fill(f32::NEG_INFINITY);
                for y in (oy * sh..oy * sh + kh).filter_map(|y| y.checked_sub(pt)).filter(|&y| y < h) {
                    // tract's comparison (`maxpool.rs`, fold_max): a NaN is never taken.
                    for (m, &v) in real.iter_mut().zip(&image[y * w..][..w]) {
                        *m = if *m < v { v } else { *m };
                    }
                }
                for (ox, o) in out.iter_mut().enumerate() {
                    let window = &down[ox * sw..][..kw];
                    // From f32::MIN as tract's pool: a window of padding and -∞ alone gives
                    // f32::MIN. (tract folds the window row by row, this op down the
                    // columns first: the same maximum, except that among zeros of both
                    // signs it may keep the other sign.)
                    *o = window.iter().fold(f32::MIN, |m, &v| if m < v { v } else { m });
                }
            }
        })
    }
}

impl TypedOp for PaddedMaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let PaddedMaxPool { c, h, w, out: (oh, ow), .. } = *self;
        ensure!(inputs.len() == 1 && inputs[0].shape.as_concrete() == Some(&[1, c, h, w][..]));
        Ok(tvec!(f32::fact([1, c, oh, ow])))
    }

    as_op!();
}

/// Replaces, in the optimised plan, each constant `Pad` of a float `[1, c, h, w]` tensor's
/// height and width (and nothing else) by a [`PaddedConcat`], which takes in the inputs
/// of the channel `Concat` that alone feeds the Pad, if there is one. Returns how many
/// it replaced.
pub fn padded_concats(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    let pads: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Pad>()).map(|n| n.id).collect();
    for id in pads {
        let node = model.node(id);
        let Some((value, pads)) = image_pad(node)? else { continue };
        let Some([_, _, h, w]) = image_shape(model, node.inputs[0])? else { continue };
        let feeder = model.node(node.inputs[0].node);
        let concat = feeder.op_as::<TypedConcat>().is_some_and(|c| c.axis == 1)
            && only_read_within(model, feeder.id, &[id].into())?;
        let inputs: Vec<OutletId> = if concat { feeder.inputs.clone() } else { vec![node.inputs[0]] };
        let mut channels = vec![];
        for &i in &inputs {
            match image_shape(model, i)? {
                Some([_, c, ih, iw]) if (ih, iw) == (h, w) => channels.push(c),
                _ => break,
            }
        }
        if channels.len() != inputs.len() {
            continue;
        }
        let op = PaddedConcat { channels, h, w, pads, value_bits: value.to_bits() };
        replace_node(model, id, "padded-concat", op, &inputs)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// Puts `op`, reading `inputs`, in the place of node `id`'s one output (the node goes
/// when the model is compacted), named after the node with `suffix`.
pub(crate) fn replace_node(
    model: &mut TypedModel,
    id: usize,
    suffix: &str,
    op: impl Into<Box<dyn TypedOp>>,
    inputs: &[OutletId],
) -> TractResult<()> {
    let mut patch = TypedModelPatch::new(format!("deskcam-{suffix}"));
    let tapped = inputs.iter().map(|&i| patch.tap_model(model, i)).collect::<TractResult<TVec<_>>>()?;
    let out = patch.wire_node(format!("{}.{suffix}", model.node(id).name), op, &tapped)?[0];
    patch.shunt_outside(model, OutletId::new(id, 0), out)?;
    patch.apply(model)
}

/// The inputs, `[1, channels[i], h, w]` floats, one after the other along the channels,
/// padded with `value` (`pads`: before and after, down and across).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PaddedConcat {
    channels: Vec<usize>,
    h: usize,
    w: usize,
    pads: HwPads,
    value_bits: u32,
}

impl PaddedConcat {
    fn out_hw(&self) -> (usize, usize) {
        let [(pt, pb), (pl, pr)] = self.pads;
        (self.h + pt + pb, self.w + pl + pr)
    }
}

impl Op for PaddedConcat {
    fn name(&self) -> StaticName {
        "DeskcamPaddedConcat".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (oh, ow) = self.out_hw();
        Ok(vec![format!("{:?} channels, {}×{} → {oh}×{ow}", self.channels, self.h, self.w)])
    }

    op_as_typed_op!();
}

impl EvalOp for PaddedConcat {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_alone(self, &inputs)
    }
}

impl EvalInto for PaddedConcat {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, _scratch: &mut Scratch) -> TractResult<()> {
        let PaddedConcat { h, w, pads: [(pt, _), (pl, _)], .. } = *self;
        let (oh, ow) = self.out_hw();
        let value = f32::from_bits(self.value_bits);
        ensure!(inputs.len() == self.channels.len(), "{} inputs for {self:?}", inputs.len());
        let total: usize = self.channels.iter().sum();
        ensure!(output.shape() == [1, total, oh, ow], "output {:?} for {self:?}", output.shape());
        let mut plain = output.try_as_plain_ram_mut()?;
        let mut planes = plain.as_slice_mut::<f32>()?.chunks_exact_mut(oh * ow);
        for (input, &c) in inputs.iter().zip(&self.channels) {
            ensure!(input.shape() == [1, c, h, w], "input {:?} for {self:?}", input.shape());
            let input = input.try_as_plain_ram()?;
            for (image, plane) in input.as_slice::<f32>()?.chunks_exact(h * w).zip(&mut planes) {
                let (top, rest) = plane.split_at_mut(pt * ow);
                let (middle, bottom) = rest.split_at_mut(h * ow);
                top.fill(value);
                bottom.fill(value);
                for (row, out) in image.chunks_exact(w).zip(middle.chunks_exact_mut(ow)) {
                    let (left, rest) = out.split_at_mut(pl);
                    let (inside, right) = rest.split_at_mut(w);
                    left.fill(value);
                    inside.copy_from_slice(row);
                    right.fill(value);
                }
            }
        }
        Ok(())
    }
}

impl TypedOp for PaddedConcat {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (oh, ow) = self.out_hw();
        ensure!(inputs.len() == self.channels.len());
        for (fact, &c) in inputs.iter().zip(&self.channels) {
            ensure!(fact.shape.as_concrete() == Some(&[1, c, self.h, self.w][..]));
        }
        Ok(tvec!(f32::fact([1, self.channels.iter().sum(), oh, ow])))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct_conv::tests::{ops, run, run_all, values};
    use tract_nnef::tract_core::ops::cnn::PoolSpec;
    use tract_nnef::tract_core::ops::math::{add, mul};

    /// The same values to the last bit (a NaN, from a value never written, differs).
    fn same_bits(ours: &Tensor, tracts: &Tensor, what: &str) {
        assert_eq!(ours.shape(), tracts.shape(), "{what}");
        let (a, b) = (ours.try_as_plain_ram().unwrap(), tracts.try_as_plain_ram().unwrap());
        let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "{what}: {differ} of {} values differ", a.len());
    }

    /// `model` and the same with its chains fused: the same outputs on `input`, and the
    /// number of resizes and pools fused.
    fn fused_against_tracts(model: TypedModel, input: &Tensor, what: &str) -> (usize, usize) {
        let mut ours = model.clone();
        let fused = fuse_chains(&mut ours).unwrap();
        same_bits(&run(ours, input), &run(model, input), what);
        fused
    }

    /// `pool_model`'s arguments.
    type PoolCase = ([usize; 3], [(usize, usize); 2], [usize; 2], [usize; 2], Option<isize>);
    /// `sum_model`'s arguments.
    type SumCase = ([usize; 3], Vec<Vec<i64>>, Vec<Vec<i64>>, Vec<(usize, usize)>, bool);

    /// Pad with -∞, a max-pool, and optionally a Downsample of the columns by `keep`.
    fn pool_model(
        [c, h, w]: [usize; 3],
        pads: [(usize, usize); 2],
        kernel: [usize; 2],
        strides: [usize; 2],
        keep: Option<isize>,
    ) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, c, h, w])).unwrap();
        let pad = Pad {
            pads: vec![(0, 0), (0, 0), pads[0], pads[1]],
            mode: PadMode::Constant(Arc::new(tensor0(f32::NEG_INFINITY))),
        };
        let y = model.wire_node("pad", pad, &[x]).unwrap()[0];
        let pool = MaxPool {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: kernel[..].into(),
                padding: PaddingSpec::Valid,
                dilations: None,
                strides: Some(strides[..].into()),
                input_channels: c,
                output_channels: c,
            },
            with_index_outputs: None,
        };
        let mut y = model.wire_node("pool", pool, &[y]).unwrap()[0];
        if let Some(stride) = keep {
            y = model.wire_node("columns", Downsample { axis: 3, stride, modulo: 0 }, &[y]).unwrap()[0];
        }
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    fn image(c: usize, h: usize, w: usize, seed: usize) -> Tensor {
        Tensor::from_shape(&[1, c, h, w], &values(c * h * w, seed)).unwrap()
    }

    #[test]
    fn the_max_pool_takes_what_tracts_takes() {
        // The network's own (3×3, rows at stride 2, columns at 1 then every other), odd
        // and even sides, one pixel, windows past the padding, no Downsample.
        let cases: &[PoolCase] = &[
            ([3, 8, 8], [(1, 1), (1, 1)], [3, 3], [2, 1], Some(2)),
            ([2, 7, 9], [(1, 1), (1, 1)], [3, 3], [2, 1], Some(2)),
            ([1, 1, 1], [(1, 1), (1, 1)], [3, 3], [2, 1], Some(2)),
            ([2, 6, 5], [(0, 1), (2, 0)], [2, 3], [1, 2], None),
            ([2, 5, 11], [(1, 1), (1, 1)], [3, 3], [1, 1], Some(3)),
            ([1, 4, 4], [(2, 2), (2, 2)], [3, 3], [2, 2], None),
            // Windows over padding alone (the first and last of each side).
            ([1, 4, 4], [(2, 2), (2, 2)], [2, 2], [2, 2], None),
        ];
        for &(shape @ [c, h, w], pads, kernel, strides, keep) in cases {
            let model = pool_model(shape, pads, kernel, strides, keep);
            let what = format!("{shape:?} pads {pads:?} kernel {kernel:?} strides {strides:?} keep {keep:?}");
            assert_eq!(fused_against_tracts(model, &image(c, h, w, 3), &what), (0, 1), "{what}");
        }
    }

    #[test]
    fn the_max_pool_takes_minus_infinity_and_nan_as_tracts_does() {
        // A channel of -∞ alone (tract's pool gives f32::MIN there), NaNs among values
        // (never taken), and a plain channel.
        let (c, h, w) = (3, 5, 6);
        let mut pixels = values(c * h * w, 9);
        pixels[..h * w].fill(f32::NEG_INFINITY);
        for i in (h * w..2 * h * w).step_by(3) {
            pixels[i] = f32::NAN;
        }
        let input = Tensor::from_shape(&[1, c, h, w], &pixels).unwrap();
        let model = pool_model([c, h, w], [(1, 1), (1, 1)], [3, 3], [2, 1], Some(2));
        assert_eq!(fused_against_tracts(model, &input, "-∞ and NaN"), (0, 1));
    }

    #[test]
    fn a_pool_whose_padding_is_read_elsewhere_is_left_alone() {
        let mut model = pool_model([1, 4, 4], [(1, 1), (1, 1)], [3, 3], [2, 1], Some(2));
        let pad = OutletId::new(model.node_by_name("pad").unwrap().id, 0);
        let pooled = model.output_outlets().unwrap()[0];
        model.select_output_outlets(&[pooled, pad]).unwrap();
        assert_eq!(fuse_chains(&mut model).unwrap(), (0, 0));
        // And a pad of zeros is not a max-pool's.
        let mut model = pool_model([1, 4, 4], [(1, 1), (1, 1)], [3, 3], [2, 1], Some(2));
        let id = model.node_by_name("pad").unwrap().id;
        model.node_mut(id).op = Box::new(Pad {
            pads: vec![(0, 0), (0, 0), (1, 1), (1, 1)],
            mode: PadMode::Constant(Arc::new(tensor0(0f32))),
        });
        assert_eq!(fuse_chains(&mut model).unwrap(), (0, 0));
    }

    /// `Σ w_k · X[rows_k][cols_k]` as Gathers, Muls and Adds, as `graph_rewrites.py`
    /// writes a bilinear resize; each term `(cols, rows)` by index into `col_sets` and
    /// `row_sets`. `weight_first` puts the weight as the Mul's first operand.
    fn sum_model(
        [c, h, w]: [usize; 3],
        col_sets: &[Vec<i64>],
        row_sets: &[Vec<i64>],
        terms: &[(usize, usize)],
        weight_first: bool,
    ) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, c, h, w])).unwrap();
        let (oh, ow) = (row_sets[0].len(), col_sets[0].len());
        let by_cols: Vec<OutletId> = col_sets
            .iter()
            .enumerate()
            .map(|(i, cols)| {
                let k = model.add_const(format!("cols{i}"), tensor1(cols)).unwrap();
                model.wire_node(format!("g_cols{i}"), Gather { axis: 3, output_type: None }, &[x, k]).unwrap()
                    [0]
            })
            .collect();
        let mut total = None;
        for (t, &(cols, rows)) in terms.iter().enumerate() {
            let k = model.add_const(format!("rows{t}"), tensor1(&row_sets[rows])).unwrap();
            let g = Gather { axis: 2, output_type: None };
            let g = model.wire_node(format!("g_rows{t}"), g, &[by_cols[cols], k]).unwrap()[0];
            let weight = Tensor::from_shape(&[1, 1, oh, ow], &values(oh * ow, t + 5)).unwrap();
            let weight = model.add_const(format!("w{t}"), weight).unwrap();
            let operands = if weight_first { [weight, g] } else { [g, weight] };
            let term = model.wire_node(format!("term{t}"), mul(), &operands).unwrap()[0];
            total = Some(match total {
                None => term,
                Some(sum) => model.wire_node(format!("sum{t}"), add(), &[sum, term]).unwrap()[0],
            });
        }
        model.select_output_outlets(&[total.unwrap()]).unwrap();
        model
    }

    #[test]
    fn the_gather_sum_computes_what_the_gathers_muls_and_adds_compute() {
        // A 2× upsample's taps, a 2× downsample's, negative indices, one column set for
        // all terms, three terms, the weight as either operand.
        let up: Vec<i64> = vec![0, 0, 1, 1, 2, 2, 3, 4, 4, 4];
        let up2: Vec<i64> = vec![0, 1, 1, 2, 2, 3, 3, 4, 4, 4];
        let cases: &[SumCase] = &[
            (
                [3, 5, 5],
                vec![up.clone(), up2.clone()],
                vec![up.clone(), up2.clone()],
                vec![(0, 0), (1, 0), (0, 1), (1, 1)],
                false,
            ),
            (
                [2, 6, 4],
                vec![vec![0, 2], vec![1, 3]],
                vec![vec![0, 2, 4], vec![1, 3, 5]],
                vec![(0, 0), (1, 0), (0, 1), (1, 1)],
                true,
            ),
            ([1, 3, 4], vec![vec![-1, 0, -4, 2]], vec![vec![2, -3]], vec![(0, 0), (0, 0)], false),
            (
                [2, 4, 3],
                vec![vec![2, 1, 0], vec![0, 0, 0]],
                vec![vec![3, 2, 1, 0, 0]],
                vec![(0, 0), (1, 0), (0, 0)],
                false,
            ),
        ];
        for (i, (shape @ [c, h, w], cols, rows, terms, weight_first)) in cases.iter().enumerate() {
            let model = sum_model(*shape, cols, rows, terms, *weight_first);
            let what = format!("case {i}");
            assert_eq!(fused_against_tracts(model, &image(*c, *h, *w, i), &what), (1, 0), "{what}");
        }
    }

    #[test]
    fn a_sum_whose_terms_are_read_elsewhere_is_left_alone() {
        let cols = vec![vec![0i64, 1], vec![1, 0]];
        let mut model = sum_model([1, 2, 2], &cols, &[vec![0, 1]], &[(0, 0), (1, 0)], false);
        let term = OutletId::new(model.node_by_name("term0").unwrap().id, 0);
        let total = model.output_outlets().unwrap()[0];
        model.select_output_outlets(&[total, term]).unwrap();
        assert_eq!(fuse_chains(&mut model).unwrap(), (0, 0));
        // One term alone is not a sum.
        let mut model = sum_model([1, 2, 2], &cols, &[vec![0, 1]], &[(0, 0)], false);
        assert_eq!(fuse_chains(&mut model).unwrap(), (0, 0));
        // Nor is a sum nested on the right, t0 + (t1 + t2): summed from the left it would
        // round otherwise. (Its inner t1 + t2, on the other column set, is a sum of its
        // own.)
        let wide = vec![vec![0i64, 1, 2, 3, 4, 5, 5, 4], vec![5, 4, 3, 2, 1, 0, 0, 1]];
        let rows = [vec![0i64, 1, 2, 3, 4, 5, 2, 3]];
        let mut model = sum_model([3, 6, 6], &wide, &rows, &[(0, 0), (1, 0), (1, 0)], false);
        let node = |m: &TypedModel, name: &str| OutletId::new(m.node_by_name(name).unwrap().id, 0);
        let (t0, t1, t2) = (node(&model, "term0"), node(&model, "term1"), node(&model, "term2"));
        let inner = model.wire_node("inner", add(), &[t1, t2]).unwrap()[0];
        let outer = model.wire_node("outer", add(), &[t0, inner]).unwrap()[0];
        model.select_output_outlets(&[outer]).unwrap();
        model.compact().unwrap(); // (sum_model's own sums, unread now, dropped)
        let input = image(3, 6, 6, 1);
        assert_eq!(fused_against_tracts(model, &input, "nested on the right"), (1, 0));
    }

    /// The models' four resizes and their max-pool (where it is float), fused, compute
    /// their outputs to the last bit.
    #[cfg(feature = "onnx")]
    #[test]
    fn the_models_compute_the_same_with_it() {
        for (file, chains) in
            [("nanodet.onnx", (4, 1)), ("nanodet-int8.onnx", (4, 1)), ("nanodet-int8-qlinear.onnx", (4, 0))]
        {
            let bytes = std::fs::read(deskcam_testkit::repo().join("models").join(file)).unwrap();
            let tracts = crate::detector::onnx_typed(&bytes).unwrap().into_decluttered().unwrap();
            let mut ours = tracts.clone();
            assert_eq!(fuse_chains(&mut ours).unwrap(), chains, "{file}");
            // (The int8 models keep their own Pads and Downsamples about their
            // convolutions.)
            let left = ops(&ours);
            assert!(!left.iter().any(|o| o == "Gather"), "{file}: a Gather is left: {left:?}");
            let n = 416;
            let input = image(3, n, n, 7);
            let (a, b) = (run_all(tracts, &input), run_all(ours, &input));
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in b.iter().zip(&a).enumerate() {
                same_bits(x, y, &format!("{file}, output {i}"));
            }
        }
    }

    /// `[1, c, h, w]` sources concatenated along the channels (when more than one) and
    /// padded with `value`.
    fn concat_pad_model(
        channels: &[usize],
        h: usize,
        w: usize,
        pads: Vec<(usize, usize)>,
        value: f32,
    ) -> TypedModel {
        let mut model = TypedModel::default();
        let xs: TVec<OutletId> = channels
            .iter()
            .enumerate()
            .map(|(i, &c)| model.add_source(format!("x{i}"), f32::fact([1, c, h, w])).unwrap())
            .collect();
        let x = if xs.len() > 1 {
            model.wire_node("concat", TypedConcat { axis: 1 }, &xs).unwrap()[0]
        } else {
            xs[0]
        };
        let pad = Pad { pads, mode: PadMode::Constant(Arc::new(tensor0(value))) };
        let y = model.wire_node("pad", pad, &[x]).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    fn concat_pad_inputs(channels: &[usize], h: usize, w: usize) -> TVec<TValue> {
        channels.iter().enumerate().map(|(i, &c)| image(c, h, w, i).into_tvalue()).collect()
    }

    #[test]
    fn the_padded_concat_computes_what_concat_and_pad_compute() {
        for (channels, h, w, pads, value) in [
            (vec![2, 3], 4, 5, vec![(0, 0), (0, 0), (1, 1), (1, 1)], 0.0),
            (vec![1, 1, 2], 3, 1, vec![(0, 0), (0, 0), (0, 2), (3, 0)], -1.5),
            (vec![4], 2, 2, vec![(0, 0), (0, 0), (1, 0), (0, 1)], 0.0),
        ] {
            let what = format!("{channels:?} {h}×{w} {pads:?}");
            let model = concat_pad_model(&channels, h, w, pads, value);
            let mut ours = model.clone();
            assert_eq!(padded_concats(&mut ours).unwrap(), 1, "{what}");
            assert!(!ops(&ours).iter().any(|o| o == "Pad" || o == "Concat"), "{what}: {:?}", ops(&ours));
            let inputs = concat_pad_inputs(&channels, h, w);
            let a = model.into_runnable().unwrap().run(inputs.clone()).unwrap();
            let b = ours.into_runnable().unwrap().run(inputs).unwrap();
            same_bits(&b[0].clone().into_tensor(), &a[0].clone().into_tensor(), &what);
        }
    }

    #[test]
    fn a_concat_read_elsewhere_stays_and_a_pad_of_the_channels_is_left_alone() {
        let mut model = concat_pad_model(&[1, 2], 3, 3, vec![(0, 0), (0, 0), (1, 1), (1, 1)], 0.0);
        let concat = OutletId::new(model.node_by_name("concat").unwrap().id, 0);
        let padded = model.output_outlets().unwrap()[0];
        model.select_output_outlets(&[padded, concat]).unwrap();
        assert_eq!(padded_concats(&mut model).unwrap(), 1);
        assert!(ops(&model).iter().any(|o| o == "Concat"), "{:?}", ops(&model));
        let mut model = concat_pad_model(&[1, 2], 3, 3, vec![(0, 0), (1, 0), (1, 1), (1, 1)], 0.0);
        assert_eq!(padded_concats(&mut model).unwrap(), 0);
    }

    /// The float model's plan, with the chains fused before optimisation and the padded
    /// concatenations after, computes its outputs to the last bit.
    #[cfg(feature = "onnx")]
    #[test]
    fn the_float_plan_computes_the_same_with_padded_concats() {
        let mut model = crate::direct_conv::tests::float_model();
        fuse_chains(&mut model).unwrap();
        let tracts = model.into_optimized().unwrap();
        let mut ours = tracts.clone();
        // Every Pad before tract's patches (in the detector, with the direct convolution
        // and Winograd, the three at stride 2 with 64–256 channels are left).
        let pads = ops(&tracts).iter().filter(|o| *o == "Pad").count();
        assert!(pads >= 3, "{pads} Pads");
        assert_eq!(padded_concats(&mut ours).unwrap(), pads);
        assert!(!ops(&ours).iter().any(|o| o == "Pad"), "{:?}", ops(&ours));
        let input = tvec![image(3, 416, 416, 7).into_tvalue()];
        let a = tracts.into_runnable().unwrap().run(input.clone()).unwrap();
        let b = ours.into_runnable().unwrap().run(input).unwrap();
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in b.iter().zip(&a).enumerate() {
            same_bits(&x.clone().into_tensor(), &y.clone().into_tensor(), &format!("output {i}"));
        }
    }
}
