//! Winograd's F(2×2, 3×3) for the float model's 3×3 stride-1 layers with many channels,
//! put into the model in place of tract's `Conv` before it is optimised.
//!
//! tract computes such a layer as one product of `c_out × 9·c_in` weights by
//! `9·c_in × pixels` gathered patches. Winograd's minimal filtering computes each 2×2
//! block of outputs from the 4×4 input tile around it with 16 products instead of 36:
//! the tile is transformed (`Bᵀ d B`, sums and differences only), multiplied element by
//! element with the transformed kernel (`G g Gᵀ`, done once when the model is loaded),
//! and transformed back (`Aᵀ m A`). Over all channels, the element-wise products are 16
//! matrix products of `c_out × c_in` by `c_in × tiles`, 2.25 times fewer multiply-adds
//! than tract's one product, and those are tract's own: the op is three nodes,
//!
//! - [`WinogradInput`]: `[1, c_in, h, w]` → `[16, c_in, tiles]`, the transformed tiles;
//! - an `EinSum` `gmk,gkn->gmn` with the transformed kernel `[16, c_out, c_in]` as a
//!   constant, which tract optimises into its packed matrix product;
//! - [`WinogradOutput`]: `[16, c_out, tiles]` → `[1, c_out, h, w]`, with the bias and
//!   the LeakyRelu that follows the convolution.
//!
//! The transforms have coefficients 0, ±1 and ±½ only, so the results differ from
//! tract's in the last bits, as another order of sums would (a test holds them to
//! tract's within a relative 1e-5).

use std::sync::Arc;

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::einsum::EinSum;

use crate::direct_conv::{bias_per_channel, replace_conv3x3, Geometry};

/// Elements of a transformed tile.
const TILE: usize = 16;

/// Replaces each float 3×3 stride-1 `Conv` of the (decluttered) model where this is
/// faster than tract's product (see [`worth_it`]) with the three nodes above. Returns how
/// many it replaced.
pub fn winograd_f32_convolutions(model: &mut TypedModel) -> TractResult<usize> {
    winograd_where(model, worth_it)
}

fn winograd_where(model: &mut TypedModel, take: impl Fn(&Geometry) -> bool) -> TractResult<usize> {
    replace_conv3x3(model, "deskcam-winograd", take, |patch, c, x| {
        let Geometry { c_in, c_out, h, w } = c.geometry;
        let kernel = Tensor::from_shape(&[TILE, c_out, c_in], &transformed_kernel(&c.kernel, c_in, c_out)?)?;
        let u = patch.add_const(format!("{}.winograd-kernel", c.name), kernel)?;
        let v = patch.wire_node(format!("{}.winograd-in", c.name), WinogradInput { c: c_in, h, w }, &[x])?[0];
        let m = patch.wire_node(
            format!("{}.winograd-product", c.name),
            EinSum::new("gmk,gkn->gmn".parse()?, f32::datum_type()),
            &[u, v],
        )?[0];
        let bias = bias_per_channel(&c.bias, c_out)?;
        let out = WinogradOutput {
            c: c_out,
            h,
            w,
            bias: Arc::new(bias.into_iter().map(f32::to_bits).collect()),
            alpha_bits: c.alpha.map(f32::to_bits),
        };
        Ok(patch.wire_node(&c.name, out, &[m])?[0])
    })
}

/// Where this is faster than tract's product: layers with 64 or more output channels
/// (those with fewer are `direct_conv`'s), measured on x86 (`MODEL_CARD.md`). On
/// aarch64 nothing is replaced until it is measured on the boards' cores:
/// `DESKCAM_WINOGRAD=1` replaces the same layers as on x86, for that measurement.
fn worth_it(g: &Geometry) -> bool {
    let many_channels = g.c_out >= 64 && g.c_in >= 16;
    if cfg!(target_arch = "aarch64") {
        return many_channels && std::env::var_os("DESKCAM_WINOGRAD").is_some();
    }
    many_channels
}

/// Tiles per column and per row: 2×2 outputs each, the last ones past the edge when a
/// side is odd.
fn tiles(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// `G g Gᵀ` for every pair of channels, as `[16][c_out][c_in]`, with
/// `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
fn transformed_kernel(kernel: &Tensor, c_in: usize, c_out: usize) -> TractResult<Vec<f32>> {
    let kernel = kernel.cast_to::<f32>()?;
    let kernel = kernel.try_as_plain_ram()?;
    let k = kernel.as_slice::<f32>()?;
    ensure!(k.len() == c_out * c_in * 9, "kernel of {} values for {c_out}×{c_in}×3×3", k.len());
    let g_rows = |a: f32, b: f32, c: f32| [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c];
    let mut u = vec![0f32; TILE * c_out * c_in];
    for co in 0..c_out {
        for ci in 0..c_in {
            let g = &k[(co * c_in + ci) * 9..][..9];
            // G g: each column of g to 4 values.
            let cols: [[f32; 4]; 3] = std::array::from_fn(|x| g_rows(g[x], g[3 + x], g[6 + x]));
            // (G g) Gᵀ: each row of G g to 4 values.
            for i in 0..4 {
                let row = g_rows(cols[0][i], cols[1][i], cols[2][i]);
                for j in 0..4 {
                    u[((i * 4 + j) * c_out + co) * c_in + ci] = row[j];
                }
            }
        }
    }
    Ok(u)
}

/// `Bᵀ d B` of every 4×4 input tile (one pixel of zero padding around the image), as
/// `[16, c, tiles]` with `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WinogradInput {
    c: usize,
    h: usize,
    w: usize,
}

impl Op for WinogradInput {
    fn name(&self) -> StaticName {
        "DeskcamWinogradInput".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} channels over {}×{}", self.c, self.h, self.w)])
    }

    op_as_typed_op!();
}

impl EvalOp for WinogradInput {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let WinogradInput { c, h, w } = *self;
        let (th, tw) = tiles(h, w);
        let input = &inputs[0];
        ensure!(input.shape() == [1, c, h, w], "input {:?} for {self:?}", input.shape());
        let input = input.try_as_plain_ram()?;
        let x = input.as_slice::<f32>()?;
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[TILE, c, th * tw])? };
        let mut plain = output.try_as_plain_ram_mut()?;
        let v = plain.as_slice_mut::<f32>()?;
        let plane = c * th * tw;
        // Four rows combined down the tile (`Bᵀ d`), each with a zero on the left and
        // zeros past the right edge, so that tile `tx` reads columns `2tx..2tx+4`.
        let padded = 2 * tw + 2;
        let mut rows = vec![0f32; 4 * padded];
        let zero = vec![0f32; w];
        for ci in 0..c {
            let image = &x[ci * h * w..][..h * w];
            let row = |y: isize| -> &[f32] {
                if y < 0 || y >= h as isize {
                    &zero
                } else {
                    &image[y as usize * w..][..w]
                }
            };
            for ty in 0..th {
                let top = 2 * ty as isize - 1;
                let (d0, d1, d2, d3) = (row(top), row(top + 1), row(top + 2), row(top + 3));
                let (s0, rest) = rows.split_at_mut(padded);
                let (s1, rest) = rest.split_at_mut(padded);
                let (s2, s3) = rest.split_at_mut(padded);
                for x in 0..w {
                    s0[1 + x] = d0[x] - d2[x];
                    s1[1 + x] = d1[x] + d2[x];
                    s2[1 + x] = d2[x] - d1[x];
                    s3[1 + x] = d1[x] - d3[x];
                }
                // Across the tile (`(Bᵀ d) B`), into the 16 planes.
                for (i, s) in rows.chunks_exact(padded).enumerate() {
                    let at = |j: usize| (i * 4 + j) * plane + ci * th * tw + ty * tw;
                    let (e0, e1, e2, e3) = (at(0), at(1), at(2), at(3));
                    for tx in 0..tw {
                        let p = &s[2 * tx..][..4];
                        v[e0 + tx] = p[0] - p[2];
                        v[e1 + tx] = p[1] + p[2];
                        v[e2 + tx] = p[2] - p[1];
                        v[e3 + tx] = p[1] - p[3];
                    }
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for WinogradInput {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let WinogradInput { c, h, w } = *self;
        ensure!(inputs.len() == 1 && inputs[0].shape.as_concrete() == Some(&[1, c, h, w][..]));
        let (th, tw) = tiles(h, w);
        Ok(tvec!(f32::fact([TILE, c, th * tw])))
    }

    as_op!();
}

/// `Aᵀ m A` of every tile's 16 products, `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`, plus the
/// bias, through the LeakyRelu when there is one: `[16, c, tiles]` → `[1, c, h, w]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WinogradOutput {
    c: usize,
    h: usize,
    w: usize,
    /// One per channel (their bits).
    bias: Arc<Vec<u32>>,
    /// The LeakyRelu's slope (its bits), when it is part of the op.
    alpha_bits: Option<u32>,
}

impl Op for WinogradOutput {
    fn name(&self) -> StaticName {
        "DeskcamWinogradOutput".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let act = self.alpha_bits.map(|a| format!(", LeakyRelu {}", f32::from_bits(a))).unwrap_or_default();
        Ok(vec![format!("{} channels over {}×{}{act}", self.c, self.h, self.w)])
    }

    op_as_typed_op!();
}

impl EvalOp for WinogradOutput {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (c, h, w) = (self.c, self.h, self.w);
        let (th, tw) = tiles(h, w);
        let input = &inputs[0];
        ensure!(input.shape() == [TILE, c, th * tw], "input {:?} for {self:?}", input.shape());
        let input = input.try_as_plain_ram()?;
        let m = input.as_slice::<f32>()?;
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[1, c, h, w])? };
        let mut plain = output.try_as_plain_ram_mut()?;
        let y = plain.as_slice_mut::<f32>()?;
        let plane = c * th * tw;
        // The leaky slope, or 1 (the identity) without the activation.
        let alpha = self.alpha_bits.map_or(1.0, f32::from_bits);
        let act = |v: f32| if v < 0.0 { v * alpha } else { v };
        // Two output rows of whole tiles, cut to the image's width when it is odd.
        let mut pair = vec![0f32; 2 * 2 * tw];
        for co in 0..c {
            let bias = f32::from_bits(self.bias[co]);
            for ty in 0..th {
                let at = |k: usize| &m[k * plane + co * th * tw + ty * tw..][..tw];
                let mk: [&[f32]; TILE] = std::array::from_fn(at);
                let (upper, lower) = pair.split_at_mut(2 * tw);
                for tx in 0..tw {
                    // Aᵀ m: down each of the 4 columns.
                    let u0: [f32; 4] = std::array::from_fn(|j| mk[j][tx] + mk[4 + j][tx] + mk[8 + j][tx]);
                    let u1: [f32; 4] =
                        std::array::from_fn(|j| mk[4 + j][tx] - mk[8 + j][tx] - mk[12 + j][tx]);
                    // (Aᵀ m) A: across each of the 2 rows.
                    upper[2 * tx] = act(u0[0] + u0[1] + u0[2] + bias);
                    upper[2 * tx + 1] = act(u0[1] - u0[2] - u0[3] + bias);
                    lower[2 * tx] = act(u1[0] + u1[1] + u1[2] + bias);
                    lower[2 * tx + 1] = act(u1[1] - u1[2] - u1[3] + bias);
                }
                let out = &mut y[co * h * w..][..h * w];
                out[2 * ty * w..][..w].copy_from_slice(&upper[..w]);
                if 2 * ty + 1 < h {
                    out[(2 * ty + 1) * w..][..w].copy_from_slice(&lower[..w]);
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for WinogradOutput {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (th, tw) = tiles(self.h, self.w);
        ensure!(inputs.len() == 1 && inputs[0].shape.as_concrete() == Some(&[TILE, self.c, th * tw][..]));
        Ok(tvec!(f32::fact([1, self.c, self.h, self.w])))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct_conv::tests::{close, close_within, one_conv, ops, run, run_all, values};

    #[test]
    fn computes_what_tracts_convolution_computes() {
        // Even and odd sides, one tile, channels of every size.
        for (c_in, c_out, h, w) in
            [(3, 5, 9, 8), (16, 16, 13, 13), (5, 7, 6, 26), (8, 64, 4, 52), (2, 3, 1, 1), (7, 2, 2, 3)]
        {
            for leaky in [false, true] {
                let what = format!("{c_in}→{c_out} over {h}×{w}, LeakyRelu {leaky}");
                let input = Tensor::from_shape(&[1, c_in, h, w], &values(c_in * h * w, 3)).unwrap();
                let tracts = one_conv(c_in, c_out, h, w, 1, leaky);
                let mut ours = tracts.clone();
                assert_eq!(winograd_where(&mut ours, |_| true).unwrap(), 1, "{what}");
                let names = ops(&ours);
                assert!(names.iter().any(|n| n == "DeskcamWinogradOutput"), "{what}: {names:?}");
                assert!(!names.iter().any(|n| n == "Conv" || n.contains("LeakyRelu")), "{what}: {names:?}");
                close(&run(ours, &input), &run(tracts, &input), &what);
            }
        }
    }

    #[test]
    fn takes_only_the_layers_with_many_channels() {
        for (model, taken, what) in [
            (one_conv(64, 64, 9, 16, 1, true), 1, "64 channels"),
            (one_conv(64, 32, 9, 16, 1, true), 0, "32 output channels"),
            (one_conv(64, 64, 9, 16, 0, true), 0, "unpadded"),
        ] {
            let mut ours = model.clone();
            let taken = if cfg!(target_arch = "aarch64") && std::env::var_os("DESKCAM_WINOGRAD").is_none() {
                0
            } else {
                taken
            };
            assert_eq!(winograd_f32_convolutions(&mut ours).unwrap(), taken, "{what}");
        }
    }

    /// The shipped float model with its 16 convolutions of 64 or more channels done this
    /// way: its outputs those of tract's plan within the tolerance of another order of
    /// sums.
    #[cfg(feature = "onnx")]
    #[test]
    fn the_float_model_computes_the_same_with_it() {
        let bytes = std::fs::read(deskcam_testkit::repo().join("models/nanodet.onnx")).unwrap();
        let tracts = crate::detector::onnx_typed(&bytes).unwrap().into_decluttered().unwrap();
        let mut ours = tracts.clone();
        // The NanoDet of models/: 24 of its 34 convolutions are 3×3 at stride 1, 16 of
        // these with 64 or more output channels (see `worth_it`).
        assert_eq!(winograd_where(&mut ours, |g| g.c_out >= 64).unwrap(), 16);
        let n = 416;
        let pixels: Vec<f32> = (0..3 * n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
        let input = Tensor::from_shape(&[1, 3, n, n], &pixels).unwrap();
        let a = run_all(tracts, &input);
        let b = run_all(ours, &input);
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in b.iter().zip(&a).enumerate() {
            // 20 layers deep, the differences grow: a relative 1e-3 of each output's range.
            close_within(x, y, 1e-3, &format!("output {i}"));
        }
    }
}
