//! A faster packer for the int8 model's activations, put into tract's optimised plan in
//! place of its own.
//!
//! Before an integer matrix product, tract copies the activations into its kernel's
//! layout: for the dot-product kernels (the Cortex-A76's SDOT, x86's VNNI) that is
//! `PackedI8K4`, panels of `r` columns in which each column's 4 consecutive K values sit
//! side by side. tract's `OptMatMulPack` writes that layout one byte at a time through
//! general strides (`PackedI8K4::pack_view`): about 7 instructions per byte, a third of
//! the int8 model's time on the Cortex-A76 (`MODEL_CARD.md`). The int8 model's inputs
//! to these products are plain row-major matrices (K rows of contiguous pixels, the
//! patches `models/quantize.py` gathers), so a block of 4 rows × `r` columns is a small
//! transpose, which this op does with whole-row reads. Its output is the same bytes as
//! tract's (a test compares them), wrapped the way `OptMatMulPack` wraps them, so the
//! matrix product that reads it is tract's own, unchanged. Inputs it does not cover
//! (another layout, batched matrices, strided columns) go to tract's packer.

use std::sync::Arc;

use tract_linalg::mmm::{EagerPackedInput, MMMInputValue, PackedExoticFact, PackedMatrixStorage};
use tract_linalg::pack::PackedI8K4;
use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::matmul::pack::{DynPackedExoticFact, OptMatMulPack};

/// Replaces each `OptMatMulPack` of the optimised plan that packs int8 activations into
/// `PackedI8K4` by [`PackI8K4`]. Returns how many it replaced.
pub fn faster_int8_packing(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(pack) = node.op_as::<OptMatMulPack>() else { continue };
        let input = model.outlet_fact(node.inputs[0])?;
        let output = &node.outputs[0].fact;
        let Some(exotic) = output.exotic_fact.as_ref().and_then(|f| f.downcast_ref::<DynPackedExoticFact>())
        else {
            continue;
        };
        let [format] = &exotic.packers[..] else { continue };
        let Some(format) = format.downcast_ref::<PackedI8K4>() else { continue };
        if input.datum_type != i8::datum_type() {
            continue;
        }
        let mapping = pack.axes_mapping(&[input], &[output])?;
        let k_axis = mapping.axis('K')?.inputs[0][0];
        let mn_axis = mapping.axis('M')?.inputs[0][0];
        let op = PackI8K4 { inner: pack.clone(), format: format.clone(), k_axis, mn_axis };
        model.node_mut(id).op = Box::new(op);
        replaced += 1;
    }
    Ok(replaced)
}

/// `OptMatMulPack` for int8 into `PackedI8K4`, with a packer for row-major matrices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PackI8K4 {
    /// tract's op: its facts and axes, and the packing of the inputs not covered here.
    inner: OptMatMulPack,
    format: PackedI8K4,
    k_axis: usize,
    mn_axis: usize,
}

impl Op for PackI8K4 {
    fn name(&self) -> StaticName {
        "DeskcamPackI8K4".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{}. k axis: {}, mn axis: {}", self.format, self.k_axis, self.mn_axis)])
    }

    op_as_typed_op!();
}

impl EvalOp for PackI8K4 {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        let shape = input.shape();
        let (k, mn) = (shape[self.k_axis], shape[self.mn_axis]);
        // One matrix (every other axis 1), its columns contiguous: the patches' form.
        let single =
            shape.iter().enumerate().all(|(ax, &d)| ax == self.k_axis || ax == self.mn_axis || d == 1);
        let strides = input.strides();
        if !single
            || input.datum_type() != i8::datum_type()
            || k == 0
            || mn == 0
            || (mn > 1 && strides[self.mn_axis] != 1)
        {
            return EvalOp::eval(&self.inner, ctx, inputs);
        }
        let plain = input.try_as_plain_ram()?;
        let src = plain.as_slice::<i8>()?;
        let row_stride = if k > 1 { strides[self.k_axis] as usize } else { mn };
        let r = self.format.r;
        let (panel_bytes, len) = packed_size(k, mn, r);
        // SAFETY: a non-zero size (k and mn are) and a power-of-two alignment
        // (PackedI8K4's, 16), the layout tract allocates for this format; pack_rows
        // writes every byte of it.
        let mut blob = unsafe { Blob::new_for_size_and_align(len, self.format.alignment()) };
        let out: &mut [u8] = blob.as_bytes_mut();
        pack_rows(src, k, mn, row_stride, r, bytemuck_i8(out));
        let packed = EagerPackedInput {
            fact: PackedExoticFact { format: Box::new(self.format.clone()), mn: mn.to_dim(), k },
            packed: Arc::new(blob),
            panel_bytes,
            mn,
        };
        let output_shape = self.inner.output_shape(shape);
        let value: Box<dyn MMMInputValue> = Box::new(packed);
        Ok(tvec!(PackedMatrixStorage::new_batched(&output_shape, tvec![value])
            .into_tensor(input.datum_type())
            .into_tvalue()))
    }
}

impl TypedOp for PackI8K4 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.inner.output_facts(inputs)
    }

    fn axes_mapping(&self, inputs: &[&TypedFact], outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        self.inner.axes_mapping(inputs, outputs)
    }

    as_op!();
}

/// The same bytes viewed as `i8` (both are one byte, every bit pattern valid in both).
pub(crate) fn bytemuck_i8(bytes: &mut [u8]) -> &mut [i8] {
    // SAFETY: u8 and i8 have the same size, alignment and valid values.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<i8>(), bytes.len()) }
}

/// The bytes of one panel of `r` columns in `PackedI8K4` (K padded to a multiple of 4),
/// and of the `ceil(mn / r)` panels [`pack_rows`] writes.
pub(crate) fn packed_size(k: usize, mn: usize, r: usize) -> (usize, usize) {
    let panel_bytes = k.div_ceil(4) * 4 * r;
    (panel_bytes, mn.div_ceil(r) * panel_bytes)
}

/// Packs a K × MN row-major matrix (`src[kk * row_stride + m]`) into `PackedI8K4` with
/// panels of `r` columns: `out[p * panel + (kk / 4) * 4r + (m % r) * 4 + kk % 4]`, the K
/// and MN padding zero. `out` is exactly `ceil(mn / r)` panels of `ceil(k / 4) * 4r`.
pub(crate) fn pack_rows(src: &[i8], k: usize, mn: usize, row_stride: usize, r: usize, out: &mut [i8]) {
    pack_rows_with(k, mn, r, out, |kk| &src[kk * row_stride..kk * row_stride + mn]);
}

/// [`pack_rows`] for a matrix whose row `kk` is `row(kk)` (`mn` values each), wherever
/// each lies: the rows of a convolution's patches read from its padded input, at each
/// kernel tap's offset, without gathering them into a matrix first.
pub(crate) fn pack_rows_with<'s>(
    k: usize,
    mn: usize,
    r: usize,
    out: &mut [i8],
    row: impl Fn(usize) -> &'s [i8],
) {
    let kb_bytes = 4 * r;
    let panel = k.div_ceil(4) * kb_bytes;
    let full_panels = mn / r;
    for kb in 0..k.div_ceil(4) {
        let rows = (kb * 4..(kb * 4 + 4).min(k)).map(&row);
        let mut block: [&[i8]; 4] = [&[]; 4];
        for (slot, row) in block.iter_mut().zip(rows) {
            *slot = row;
        }
        let blocks = out.chunks_exact_mut(panel).map(|p| &mut p[kb * kb_bytes..(kb + 1) * kb_bytes]);
        if r.is_multiple_of(8) && block.iter().all(|row| row.len() == mn) {
            // Four whole rows: every full panel is r / 8 transposes of 4 × 8 (columns
            // m..m + 8 of the panel are its bytes 4m..4m + 32); `cols(at)` is columns
            // at..at + 8 of the four rows.
            let cols = |at: usize| {
                block.map(|row| -> [i8; 8] {
                    let mut c = [0; 8];
                    c.copy_from_slice(&row[at..at + 8]);
                    c
                })
            };
            for (p, dst) in blocks.enumerate().take(full_panels) {
                if let Ok(dst) = <&mut [i8; 32]>::try_from(&mut *dst) {
                    // r = 8 (the Cortex-A76's kernel): one transpose, written in place.
                    *dst = transpose_4x8(&cols(p * 8));
                    continue;
                }
                for (g, dst) in dst.chunks_exact_mut(32).enumerate() {
                    dst.copy_from_slice(&transpose_4x8(&cols(p * r + g * 8)));
                }
            }
            finish_partial(&block, r, full_panels, out, panel, kb);
        } else {
            finish_partial(&block, r, 0, out, panel, kb);
        }
    }
}

/// Writes one K block of the panels from `first` on, element by element (the last,
/// part-filled panel, the K padding, and an `r` that is not a multiple of 8); padding
/// is zero.
fn finish_partial(block: &[&[i8]; 4], r: usize, first: usize, out: &mut [i8], panel: usize, kb: usize) {
    for (p, dst) in out.chunks_exact_mut(panel).enumerate().skip(first) {
        let dst = &mut dst[kb * 4 * r..(kb + 1) * 4 * r];
        for lm in 0..r {
            let m = p * r + lm;
            for (kr, row) in block.iter().enumerate() {
                // (A row is mn long, or empty past K: both give the padding's zero.)
                dst[lm * 4 + kr] = row.get(m).copied().unwrap_or(0);
            }
        }
    }
}

/// Four rows of 8 values → 8 columns of 4 (each column's values side by side).
#[inline(always)]
fn transpose_4x8(rows: &[[i8; 8]; 4]) -> [i8; 32] {
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: NEON is part of every aarch64 target; the loads read 8 bytes from
        // each 8-byte array and the stores write 32 bytes into the 32-byte result.
        unsafe {
            use std::arch::aarch64::*;
            let r0 = vld1_s8(rows[0].as_ptr());
            let r1 = vld1_s8(rows[1].as_ptr());
            let r2 = vld1_s8(rows[2].as_ptr());
            let r3 = vld1_s8(rows[3].as_ptr());
            // (r0, r1) and (r2, r3) byte pairs, then the pairs side by side.
            let a = vzip_s8(r0, r1);
            let b = vzip_s8(r2, r3);
            let lo = vzip_s16(vreinterpret_s16_s8(a.0), vreinterpret_s16_s8(b.0));
            let hi = vzip_s16(vreinterpret_s16_s8(a.1), vreinterpret_s16_s8(b.1));
            let mut out = [0i8; 32];
            vst1q_s8(out.as_mut_ptr(), vcombine_s8(vreinterpret_s8_s16(lo.0), vreinterpret_s8_s16(lo.1)));
            vst1q_s8(
                out.as_mut_ptr().add(16),
                vcombine_s8(vreinterpret_s8_s16(hi.0), vreinterpret_s8_s16(hi.1)),
            );
            out
        }
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let mut out = [0i8; 32];
        for m in 0..8 {
            for (kr, row) in rows.iter().enumerate() {
                out[m * 4 + kr] = row[m];
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tract_linalg::mmm::MMMInputFormat;

    /// tract's own packer's bytes for a K × MN row-major matrix.
    fn tract_packed(src: &[i8], k: usize, mn: usize, r: usize) -> Vec<i8> {
        let t = Tensor::from_shape(&[k, mn], src).unwrap();
        let v = PackedI8K4::new(r).prepare_one(&t, 0, 1).unwrap();
        let eager = v.downcast_ref::<EagerPackedInput>().expect("an eager packed input");
        eager.packed.as_bytes().iter().map(|&b| b as i8).collect()
    }

    #[test]
    fn the_same_bytes_as_tracts_packer() {
        // Full and part-filled panels, K a multiple of 4 and not, one row, one column.
        for (k, mn) in [(8, 16), (9, 19), (27, 43), (1, 8), (4, 1), (3, 5), (288, 107), (13, 64)] {
            for r in [4, 8, 16] {
                let src: Vec<i8> = (0..k * mn).map(|i| ((i * 37 + k) % 251) as i8).collect();
                let want = tract_packed(&src, k, mn, r);
                let mut got = vec![0x55i8; want.len()];
                pack_rows(&src, k, mn, mn, r, &mut got);
                assert_eq!(got, want, "k {k}, mn {mn}, r {r}");
            }
        }
    }

    #[test]
    fn a_row_stride_wider_than_the_row() {
        // Rows of 10 of which the matrix uses 7: the rest must not leak in.
        let (k, mn, stride) = (6, 7, 10);
        let src: Vec<i8> = (0..k * stride).map(|i| i as i8).collect();
        let dense: Vec<i8> = (0..k).flat_map(|kk| src[kk * stride..kk * stride + mn].to_vec()).collect();
        let want = tract_packed(&dense, k, mn, 8);
        let mut got = vec![0x55i8; want.len()];
        pack_rows(&src, k, mn, stride, 8, &mut got);
        assert_eq!(got, want);
    }

    /// Rows at a convolution's tap offsets in two sources (as the patches of a padded
    /// input's flattened rows, and of a second phase): the same bytes as tract's packing
    /// of the gathered matrix, K not a multiple of 4 and the last panel part-filled.
    #[test]
    fn rows_read_where_they_lie() {
        let (channels, width, mn) = (3, 23, 37);
        let sources: [Vec<i8>; 2] = [
            (0..channels * 100).map(|i| (i * 7) as i8).collect(),
            (0..channels * 100).map(|i| (i * 3 + 1) as i8).collect(),
        ];
        // (source, start) per tap, each giving `channels` rows.
        let taps = [(0, 0), (0, 1), (1, width), (0, width + 2), (1, 2 * width)];
        let row = |kk: usize| {
            let (source, start) = taps[kk / channels];
            let at = (kk % channels) * 100 + start;
            &sources[source][at..at + mn]
        };
        let k = taps.len() * channels;
        let dense: Vec<i8> = (0..k).flat_map(|kk| row(kk).to_vec()).collect();
        let want = tract_packed(&dense, k, mn, 8);
        let mut got = vec![0x55i8; want.len()];
        pack_rows_with(k, mn, 8, &mut got, row);
        assert_eq!(got, want);
    }

    /// The shipped int8 model, optimised by tract, gives the same outputs to the last
    /// bit with this packer in its plan as with tract's.
    #[cfg(feature = "onnx")]
    #[test]
    fn the_int8_model_computes_the_same_with_this_packer() {
        let path = deskcam_testkit::repo().join("models/nanodet-int8-qlinear.onnx");
        let bytes = std::fs::read(&path).unwrap();
        let tracts = crate::detector::onnx_typed(&bytes).unwrap().into_optimized().unwrap();
        let mut ours = tracts.clone();
        let replaced = faster_int8_packing(&mut ours).unwrap();
        // Every packing into the dot-product layout is ours: a second pass finds none left
        // (tract may pack the others' activations for its other kernels, e.g. on x86 with
        // AVX-512 VNNI for some products and not others).
        assert_eq!(faster_int8_packing(&mut ours.clone()).unwrap(), 0);
        let n = 416;
        let pixels: Vec<f32> = (0..3 * n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
        let input = Tensor::from_shape(&[1, 3, n, n], &pixels).unwrap();
        let a = tracts.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
        let b = ours.into_runnable().unwrap().run(tvec!(input.into_tvalue())).unwrap();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(**x, **y);
        }
        // tract picks the K=4-interleaved layout where the CPU has a dot-product kernel
        // (aarch64 SDOT, x86 VNNI); elsewhere nothing is replaced and both plans are tract's.
        eprintln!("{replaced} packing nodes replaced");
        assert!(
            !has_dot_product_kernel() || replaced > 0,
            "the dot-product kernel's packing was not replaced"
        );
    }

    /// Whether tract has an int8 dot-product kernel on this CPU (and packs for it in
    /// `PackedI8K4`).
    pub(crate) fn has_dot_product_kernel() -> bool {
        #[cfg(target_arch = "aarch64")]
        let dot = std::arch::is_aarch64_feature_detected!("dotprod");
        #[cfg(target_arch = "x86_64")]
        let dot = is_x86_feature_detected!("avxvnni") || is_x86_feature_detected!("avx512vnni");
        #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
        let dot = false;
        dot
    }
}
