//! A faster gatherer for the float model's convolution patches, put into tract's
//! optimised plan in place of its own.
//!
//! tract runs each 3×3 float convolution as a matrix product whose right-hand side is
//! gathered lazily (`LazyIm2col`): for a panel of `r` output pixels it reads, for every
//! row of K (input channel × kernel tap), `r` floats through a table of per-pixel
//! offsets, one scalar load and store each. At stride 1 the `r` pixels of a panel that
//! lie in one output row read `r` consecutive floats of the (padded) input, so a row of
//! the panel is one contiguous copy; this op does that copy, and tract's per-element
//! gather for the panels that straddle two output rows or a stride-2 convolution's.
//! The panels are the same floats in the same places (a test compares the model's
//! outputs bit for bit), in the layout tract's packer format names, and the matrix
//! product that reads them is tract's own, unchanged.
//!
//! tract does not export its lazy-im2col op, so the offsets are rebuilt here from the
//! convolution's geometry (read off the decluttered model before optimisation) and the
//! padded input's shape, and used only when their counts agree with the product's K and
//! N; anything else keeps tract's op.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tract_linalg::mmm::{MMMInputFormat, MMMInputValue, PackedMatrixStorage};
use tract_linalg::pack::{PackedFormat, PackingWriter};
use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::cnn::conv::Conv;
use tract_nnef::tract_core::ops::matmul::pack::DynPackedExoticFact;
use tract_nnef::tract_core::ops::nn::DataFormat;

/// The geometry of a float convolution, by node name, as tract's codegen will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGeometry {
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
}

/// The 2-D, ungrouped NCHW float convolutions of a (decluttered) model, by node name.
pub fn conv_geometries(model: &TypedModel) -> HashMap<String, ConvGeometry> {
    model
        .nodes()
        .iter()
        .filter_map(|node| {
            let conv = node.op_as::<Conv>()?;
            let spec = &conv.pool_spec;
            let input = model.outlet_fact(*node.inputs.first()?).ok()?;
            (conv.group == 1
                && conv.q_params.is_none()
                && input.datum_type == f32::datum_type()
                && spec.data_format == DataFormat::NCHW
                && spec.kernel_shape.len() == 2)
                .then(|| {
                    let geometry = ConvGeometry {
                        kernel: spec.kernel_shape.to_vec(),
                        strides: spec.strides().to_vec(),
                        dilations: spec.dilations().to_vec(),
                    };
                    (node.name.clone(), geometry)
                })
        })
        .collect()
}

/// Replaces each float `LazyIm2col` of the optimised plan whose convolution is in
/// `convs` by [`F32Im2col`]. Returns how many it replaced.
pub fn faster_f32_im2col(
    model: &mut TypedModel,
    convs: &HashMap<String, ConvGeometry>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        if node.op.name() != "LazyIm2col" || node.inputs.len() != 1 {
            continue;
        }
        let Some(geometry) = node.name.strip_suffix(".lazyIm2col").and_then(|conv| convs.get(conv)) else {
            continue;
        };
        let input = model.outlet_fact(node.inputs[0])?;
        let output = node.outputs[0].fact.clone();
        let Some(exotic) = output.exotic_fact.as_ref().and_then(|f| f.downcast_ref::<DynPackedExoticFact>())
        else {
            continue;
        };
        let [format] = &exotic.packers[..] else { continue };
        let Some(packer) = format.downcast_ref::<PackedFormat>() else { continue };
        let (Some(shape), Ok(k), Ok(mn)) =
            (input.shape.as_concrete(), exotic.k.to_usize(), exotic.mn.to_usize())
        else {
            continue;
        };
        if input.datum_type != f32::datum_type() || packer.dt != f32::datum_type() {
            continue;
        }
        let Some(params) = Im2colParams::new(shape, geometry, packer.clone()) else { continue };
        if params.k_offsets.len() != k || params.n_offsets.len() != mn {
            continue;
        }
        model.node_mut(id).op = Box::new(F32Im2col { params: Arc::new(params), fact: output });
        replaced += 1;
    }
    Ok(replaced)
}

/// Offsets, in floats, into the padded NCHW input: `n_offsets[pixel] + k_offsets[row]`
/// is where a patch element sits (tract's order: pixels row-major; K rows by input
/// channel, then kernel row, then kernel column).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Im2colParams {
    packer: PackedFormat,
    n_offsets: Vec<usize>,
    k_offsets: Vec<usize>,
    /// Whether panel `i`'s `r` pixels read consecutive floats (one output row, stride 1).
    contiguous: Vec<bool>,
    /// Floats the input must hold (its shape's volume), checked at each run.
    input_len: usize,
}

impl Im2colParams {
    /// For a valid (unpadded: tract pads the input before) convolution over an input of
    /// `shape` (1 × C × H × W).
    fn new(shape: &[usize], g: &ConvGeometry, packer: PackedFormat) -> Option<Self> {
        let &[1, c, h, w] = shape else { return None };
        let pair = |v: &[usize]| <[usize; 2]>::try_from(v).ok();
        let ([kh, kw], [sh, sw], [dh, dw]) = (pair(&g.kernel)?, pair(&g.strides)?, pair(&g.dilations)?);
        let span = |k: usize, d: usize| (k - 1) * d + 1;
        if kh == 0 || kw == 0 || sh == 0 || sw == 0 || h < span(kh, dh) || w < span(kw, dw) || packer.r == 0 {
            return None;
        }
        let (oh, ow) = ((h - span(kh, dh)) / sh + 1, (w - span(kw, dw)) / sw + 1);
        let n_offsets: Vec<usize> = (0..oh).flat_map(|y| (0..ow).map(move |x| y * sh * w + x * sw)).collect();
        let k_offsets: Vec<usize> = (0..c)
            .flat_map(|ci| {
                (0..kh).flat_map(move |ky| (0..kw).map(move |kx| ci * h * w + ky * dh * w + kx * dw))
            })
            .collect();
        let r = packer.r;
        let contiguous = n_offsets
            .chunks(r)
            .map(|p| p.len() == r && p.windows(2).all(|pair| pair[1] == pair[0] + 1))
            .collect();
        Some(Im2colParams { packer, n_offsets, k_offsets, contiguous, input_len: c * h * w })
    }
}

/// What the packed matrix takes in memory, as tract's own lazy im2col says it.
impl ExoticFact for Im2colParams {
    fn buffer_sizes(&self) -> TVec<TDim> {
        tvec!((self.k_offsets.len() * self.n_offsets.len() * std::mem::size_of::<f32>()).to_dim())
    }
}

/// tract's `LazyIm2col` for a float input, with contiguous copies where a panel allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct F32Im2col {
    params: Arc<Im2colParams>,
    /// tract's op's output fact (the packed matrix's K, N and format), kept as it was.
    fact: TypedFact,
}

impl Op for F32Im2col {
    fn name(&self) -> StaticName {
        "DeskcamF32Im2col".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let p = &self.params;
        let contiguous = p.contiguous.iter().filter(|&&c| c).count();
        Ok(vec![format!(
            "{}; k {}, n {}; {contiguous} of {} panels copied whole",
            p.packer,
            p.k_offsets.len(),
            p.n_offsets.len(),
            p.contiguous.len()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for F32Im2col {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let tensor = args_1!(inputs);
        if tensor.datum_type() != f32::datum_type() || tensor.len() != self.params.input_len {
            bail!("DeskcamF32Im2col: expected {} floats, got {:?}", self.params.input_len, tensor);
        }
        let value: Box<dyn MMMInputValue> = Box::new(F32Im2colInput { tensor, params: self.params.clone() });
        let output = PackedMatrixStorage::new_batched(&[1, 1], tvec![value]).into_tensor(f32::datum_type());
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for F32Im2col {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.fact.clone()))
    }

    as_op!();
}

/// One run's packed right-hand side: the input and how to gather from it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct F32Im2colInput {
    tensor: TValue,
    params: Arc<Im2colParams>,
}

impl Hash for F32Im2colInput {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.tensor.as_bytes(), &*self.params).hash(state);
    }
}

impl fmt::Display for F32Im2colInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeskcamF32Im2col input (k {}, n {})", self.k(), self.mn())
    }
}

impl MMMInputValue for F32Im2colInput {
    fn format(&self) -> &dyn MMMInputFormat {
        &self.params.packer
    }

    fn scratch_panel_buffer_layout(&self) -> Option<std::alloc::Layout> {
        Some(self.params.packer.single_panel_layout(self.k(), std::mem::size_of::<f32>()))
    }

    fn panel_bytes(&self, i: usize, buffer: Option<*mut u8>) -> TractResult<*const u8> {
        let buffer = buffer.ok_or_else(|| format_err!("DeskcamF32Im2col: no panel buffer"))?;
        let p = &*self.params;
        let r = p.packer.r;
        let start = i * r;
        if start >= p.n_offsets.len() {
            bail!("DeskcamF32Im2col: panel {i} past n {}", p.n_offsets.len());
        }
        let pixels = &p.n_offsets[start..(start + r).min(p.n_offsets.len())];
        let src = self.tensor.try_as_plain_ram()?.as_slice::<f32>()?;
        let out = buffer.cast::<f32>();
        if p.contiguous[i] {
            // One output row at stride 1: each K row of the panel is `r` consecutive
            // floats of the input, written where tract's single-panel writer puts them
            // (K-outer, `r` floats per row). A fixed width makes the copy a few vector
            // moves rather than a call to memcpy per row.
            let first = pixels[0];
            match r {
                4 => copy_rows::<4>(src, &p.k_offsets, first, out),
                6 => copy_rows::<6>(src, &p.k_offsets, first, out),
                8 => copy_rows::<8>(src, &p.k_offsets, first, out),
                12 => copy_rows::<12>(src, &p.k_offsets, first, out),
                16 => copy_rows::<16>(src, &p.k_offsets, first, out),
                _ => {
                    let mut writer = p.packer.write_single_panel_with_k_outer(out);
                    gather(&mut writer, src, &p.k_offsets, pixels);
                }
            }
        } else if pixels.len() == r {
            let mut writer = p.packer.write_single_panel_with_k_outer(out);
            gather(&mut writer, src, &p.k_offsets, pixels);
        } else {
            let mut writer = p.packer.write_with_k_outer(out, p.k_offsets.len(), pixels.len());
            gather(&mut writer, src, &p.k_offsets, pixels);
        }
        Ok(buffer)
    }

    fn k(&self) -> usize {
        self.params.k_offsets.len()
    }

    fn mn(&self) -> usize {
        self.params.n_offsets.len()
    }

    fn exotic_fact(&self) -> &dyn ExoticFact {
        &*self.params
    }

    fn extract_at_mn_f16(&self, _mn: usize, _slice: &mut [f16]) -> TractResult<()> {
        bail!("DeskcamF32Im2col: no f16 extraction")
    }

    fn extract_at_mn_f32(&self, mn: usize, slice: &mut [f32]) -> TractResult<()> {
        let p = &*self.params;
        let src = self.tensor.try_as_plain_ram()?.as_slice::<f32>()?;
        let n =
            *p.n_offsets.get(mn).ok_or_else(|| format_err!("DeskcamF32Im2col: pixel {mn} past the end"))?;
        for (dst, &k_off) in slice.iter_mut().zip(&p.k_offsets) {
            *dst = src[k_off + n];
        }
        Ok(())
    }
}

/// Copies `R` floats from `src[k_off + first..]` for each K row into row after row of
/// the panel at `out`.
#[inline(always)]
fn copy_rows<const R: usize>(src: &[f32], k_offsets: &[usize], first: usize, out: *mut f32) {
    for (row, &k_off) in k_offsets.iter().enumerate() {
        let from: &[f32; R] = src[k_off + first..k_off + first + R].try_into().expect("R floats");
        // SAFETY: `out` is tract's scratch panel for this input, laid out by
        // `scratch_panel_buffer_layout`: at least k × R floats, aligned for f32.
        unsafe { out.add(row * R).cast::<[f32; R]>().write_unaligned(*from) };
    }
}

/// tract's order for a panel that is not one contiguous run: K-outer, the panel's
/// pixels in turn.
fn gather(writer: &mut impl PackingWriter<f32>, src: &[f32], k_offsets: &[usize], pixels: &[usize]) {
    for &k_off in k_offsets {
        for &n in pixels {
            writer.write(src[k_off + n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_tracts_order() {
        let g = ConvGeometry { kernel: vec![2, 3], strides: vec![1, 2], dilations: vec![2, 1] };
        // 2 channels of 5 × 7: kernel rows 2 apart (span 3), columns 1 apart (span 3).
        let p = Im2colParams::new(&[1, 2, 5, 7], &g, PackedFormat::new(f32::datum_type(), 2, 4)).unwrap();
        assert_eq!(p.n_offsets, [0, 2, 4, 7, 9, 11, 14, 16, 18]);
        assert_eq!(p.k_offsets, [0, 1, 2, 14, 15, 16, 35, 36, 37, 49, 50, 51]);
        // Stride 2 across: no panel reads consecutive floats.
        assert!(p.contiguous.iter().all(|&c| !c));
        let g = ConvGeometry { kernel: vec![3, 3], strides: vec![1, 1], dilations: vec![1, 1] };
        let p = Im2colParams::new(&[1, 1, 4, 5], &g, PackedFormat::new(f32::datum_type(), 2, 4)).unwrap();
        // Output 2 × 3: panels (0,0) (0,1) | (0,2) (1,0) | (1,1) (1,2); the middle one straddles two rows.
        assert_eq!(p.n_offsets, [0, 1, 2, 5, 6, 7]);
        assert_eq!(p.contiguous, [true, false, true]);
        // A kernel larger than the input has no valid position.
        assert!(Im2colParams::new(&[1, 1, 2, 5], &g, PackedFormat::new(f32::datum_type(), 2, 4)).is_none());
    }

    #[cfg(feature = "onnx")]
    #[test]
    fn the_float_model_computes_the_same_with_this_gatherer() {
        let path = deskcam_testkit::repo().join("models/nanodet.onnx");
        let bytes = std::fs::read(&path).unwrap();
        let model = crate::detector::onnx_typed(&bytes).unwrap().into_decluttered().unwrap();
        let convs = conv_geometries(&model);
        let tracts = model.into_optimized().unwrap();
        let lazy = tracts.nodes().iter().filter(|n| n.op.name() == "LazyIm2col").count();
        let mut ours = tracts.clone();
        let replaced = faster_f32_im2col(&mut ours, &convs).unwrap();
        // Every lazily gathered convolution of the model is replaced, and most of their
        // panels are whole-row copies (the fast path is the one taken).
        assert!(lazy > 0 && replaced == lazy, "{replaced} of {lazy} replaced");
        let (mut copied, mut panels) = (0, 0);
        for node in ours.nodes() {
            if let Some(op) = node.op_as::<F32Im2col>() {
                copied += op.params.contiguous.iter().filter(|&&c| c).count();
                panels += op.params.contiguous.len();
            }
        }
        assert!(copied * 2 > panels, "{copied} of {panels} panels copied whole");
        crate::assert_same_outputs(tracts, ours);
    }
}
