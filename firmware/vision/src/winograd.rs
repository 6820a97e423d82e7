//! Winograd's minimal filtering for the float model's 3×3 stride-1 layers with many
//! channels, put into the model in place of tract's `Conv` before it is optimised.
//!
//! tract computes such a layer as one product of `c_out × 9·c_in` weights by
//! `9·c_in × pixels` gathered patches. Winograd's F(m×m, 3×3) computes each m×m block
//! of outputs from the (m+2)×(m+2) input tile around it: the tile is transformed
//! (`Bᵀ d B`), multiplied element by element with the transformed kernel (`G g Gᵀ`,
//! done once when the model is loaded), and transformed back (`Aᵀ m A`). Over all
//! channels, the element-wise products are (m+2)² matrix products of `c_out × c_in` by
//! `c_in × tiles`, and those are tract's own: the op is three nodes,
//!
//! - [`WinogradInput`]: `[1, c_in, h, w]` → `[(m+2)², c_in, tiles]`, the transformed tiles;
//! - an `EinSum` `gmk,gkn->gmn` with the transformed kernel `[(m+2)², c_out, c_in]` as a
//!   constant, which tract optimises into its packed matrix product;
//! - [`WinogradOutput`]: `[(m+2)², c_out, tiles]` → `[1, c_out, h, w]`, with the bias
//!   and the LeakyRelu that follows the convolution.
//!
//! F(2×2, 3×3) takes 16 products for 4 outputs, F(4×4, 3×3) 36 for 16: 2.25 and 4 times
//! fewer multiply-adds than the 9 per output of tract's product, and the transformed
//! tiles, which go through memory twice, are 4 and 2.25 values per input value. The
//! larger tile's coefficients (¼, ⅙, 1/24; 2, 4, 5, 8) lose a few more bits than the
//! smaller's (0, ±1, ±½): tests hold both to tract's convolution.

use std::sync::Arc;

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::einsum::EinSum;

use crate::direct_conv::{activation_info, bytemuck_f32, replace_conv3x3, Geometry};
use crate::reuse::{eval_alone, EvalInto, Scratch};

/// Replaces each float 3×3 stride-1 `Conv` of the (decluttered) model where this is
/// faster than tract's product (see [`worth_it`]) with the three nodes above. Returns how
/// many it replaced.
pub fn winograd_f32_convolutions(model: &mut TypedModel) -> TractResult<usize> {
    winograd_where(model, |g| worth_it(g).then(|| tiling_for(g)))
}

/// F(4×4) where the grid is large (52×52 and more), F(2×2) below: with the larger tile
/// a 26×26 grid has 49 tiles, too few columns for tract's product to run at its pace
/// (its 36 products of 64 × 128 by 128 × 49 took as long as F(2×2)'s 16 of 64 × 128 by
/// 128 × 169). x86, 5 alternating rounds of `deskcam bench` (medians of 10 runs):
/// 82.6–88.8 ms (median 87.6) against 85.4–94.3 (median 92.6) with F(2×2) everywhere.
fn tiling_for(g: &Geometry) -> Tiling {
    if g.h * g.w >= 52 * 52 {
        Tiling::F4
    } else {
        Tiling::F2
    }
}

/// Which minimal filtering: outputs per tile side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Tiling {
    /// F(2×2, 3×3).
    F2,
    /// F(4×4, 3×3).
    F4,
}

impl Tiling {
    /// Outputs per tile side.
    fn m(self) -> usize {
        match self {
            Tiling::F2 => 2,
            Tiling::F4 => 4,
        }
    }

    /// Inputs per tile side, and elements of a transformed tile.
    fn alpha(self) -> usize {
        self.m() + 2
    }

    fn planes(self) -> usize {
        self.alpha() * self.alpha()
    }

    /// Tiles per column and per row, the last ones past the edge when a side is not a
    /// whole number of tiles.
    fn tiles(self, h: usize, w: usize) -> (usize, usize) {
        (h.div_ceil(self.m()), w.div_ceil(self.m()))
    }
}

/// One side of a tiling's transforms, written out (the compiler sees each coefficient).
trait Minimal {
    const M: usize;
    const A: usize;
    /// `Bᵀ d` of one column or row of a tile (the first `A` values of each).
    fn input(d: &[f32; 6]) -> [f32; 6];
    /// `Aᵀ m` (the first `A` values in, the first `M` out).
    fn output(m: &[f32; 6]) -> [f32; 4];
    /// `G g`.
    fn kernel(g: [f64; 3]) -> [f64; 6];
}

struct F2;
impl Minimal for F2 {
    const M: usize = 2;
    const A: usize = 4;
    #[inline(always)]
    fn input(d: &[f32; 6]) -> [f32; 6] {
        // Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3], 0.0, 0.0]
    }
    #[inline(always)]
    fn output(m: &[f32; 6]) -> [f32; 4] {
        // Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]
        [m[0] + m[1] + m[2], m[1] - m[2] - m[3], 0.0, 0.0]
    }
    fn kernel(g: [f64; 3]) -> [f64; 6] {
        // G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]
        [g[0], (g[0] + g[1] + g[2]) / 2.0, (g[0] - g[1] + g[2]) / 2.0, g[2], 0.0, 0.0]
    }
}

struct F4;
impl Minimal for F4 {
    const M: usize = 4;
    const A: usize = 6;
    #[inline(always)]
    fn input(d: &[f32; 6]) -> [f32; 6] {
        // Bᵀ = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
        //       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        let a = d[4] - 4.0 * d[2];
        let b = d[3] - 4.0 * d[1];
        let c = d[4] - d[2];
        let e = 2.0 * (d[3] - d[1]);
        [4.0 * d[0] - 5.0 * d[2] + d[4], a + b, a - b, c + e, c - e, 4.0 * d[1] - 5.0 * d[3] + d[5]]
    }
    #[inline(always)]
    fn output(m: &[f32; 6]) -> [f32; 4] {
        // Aᵀ = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
        //       [0, 1, -1, 8, -8, 1]]
        let (s12, d12) = (m[1] + m[2], m[1] - m[2]);
        let (s34, d34) = (m[3] + m[4], m[3] - m[4]);
        [m[0] + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m[5]]
    }
    fn kernel(g: [f64; 3]) -> [f64; 6] {
        // G = [[¼, 0, 0], [-⅙, -⅙, -⅙], [-⅙, ⅙, -⅙], [1/24, 1/12, ⅙], [1/24, -1/12, ⅙],
        //      [0, 0, 1]]
        [
            g[0] / 4.0,
            -(g[0] + g[1] + g[2]) / 6.0,
            -(g[0] - g[1] + g[2]) / 6.0,
            g[0] / 24.0 + g[1] / 12.0 + g[2] / 6.0,
            g[0] / 24.0 - g[1] / 12.0 + g[2] / 6.0,
            g[2],
        ]
    }
}

fn winograd_where(model: &mut TypedModel, take: impl Fn(&Geometry) -> Option<Tiling>) -> TractResult<usize> {
    // Stride 1 only, whoever asks: the tiles are of consecutive outputs.
    let take = |g: &Geometry| if g.stride == 1 { take(g) } else { None };
    replace_conv3x3(model, "deskcam-winograd", take, |patch, c, tiling, x| {
        let Geometry { c_in, c_out, h, w, .. } = c.geometry;
        let values = match tiling {
            Tiling::F2 => transformed_kernel::<F2>(&c.kernel, c_in, c_out),
            Tiling::F4 => transformed_kernel::<F4>(&c.kernel, c_in, c_out),
        };
        let kernel = Tensor::from_shape(&[tiling.planes(), c_out, c_in], &values)?;
        let u = patch.add_const(format!("{}.winograd-kernel", c.name), kernel)?;
        let input = WinogradInput { tiling, c: c_in, h, w };
        let v = patch.wire_node(format!("{}.winograd-in", c.name), input, &[x])?[0];
        let m = patch.wire_node(
            format!("{}.winograd-product", c.name),
            EinSum::new("gmk,gkn->gmn".parse()?, f32::datum_type()),
            &[u, v],
        )?[0];
        let out = WinogradOutput {
            tiling,
            c: c_out,
            h,
            w,
            bias: Arc::new(c.bias.iter().map(|b| b.to_bits()).collect()),
            alpha_bits: c.alpha.map(f32::to_bits),
        };
        Ok(patch.wire_node(&c.name, out, &[m])?[0])
    })
}

/// Where this is faster than tract's product: layers with 64 or more output channels
/// (those with fewer are `direct_conv`'s), measured on x86, and on the boards' cores
/// counted, not timed (`MODEL_CARD.md`: instructions per inference in the arm64 VM,
/// Cortex-A72 803 M → 646 M, A53 1,314 M → 975 M).
fn worth_it(g: &Geometry) -> bool {
    many_channels(g)
}

/// 64 or more output channels: where this was measured faster (with 16 or 32 the
/// transforms weigh more than the products they save, and `direct_conv` is faster).
fn many_channels(g: &Geometry) -> bool {
    g.c_out >= 64 && g.stride == 1
}

/// `G g Gᵀ` for every pair of channels, as `[(m+2)²][c_out][c_in]` (in f64, rounded
/// once).
fn transformed_kernel<T: Minimal>(k: &[f32], c_in: usize, c_out: usize) -> Vec<f32> {
    let a = T::A;
    let mut u = vec![0f32; a * a * c_out * c_in];
    for co in 0..c_out {
        for ci in 0..c_in {
            let g = &k[(co * c_in + ci) * 9..][..9];
            // G g: each column of g to A values.
            let cols: [[f64; 6]; 3] =
                std::array::from_fn(|x| T::kernel([g[x] as f64, g[3 + x] as f64, g[6 + x] as f64]));
            // (G g) Gᵀ: each row of G g to A values.
            for i in 0..a {
                let row = T::kernel([cols[0][i], cols[1][i], cols[2][i]]);
                for (j, value) in row.iter().take(a).enumerate() {
                    u[((i * a + j) * c_out + co) * c_in + ci] = *value as f32;
                }
            }
        }
    }
    u
}

/// `Bᵀ d B` of every tile (one pixel of zero padding around the image), as
/// `[(m+2)², c, tiles]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WinogradInput {
    tiling: Tiling,
    c: usize,
    h: usize,
    w: usize,
}

impl Op for WinogradInput {
    fn name(&self) -> StaticName {
        "DeskcamWinogradInput".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}, {} channels over {}×{}", self.tiling, self.c, self.h, self.w)])
    }

    op_as_typed_op!();
}

impl EvalOp for WinogradInput {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_alone(self, &inputs)
    }
}

impl EvalInto for WinogradInput {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, scratch: &mut Scratch) -> TractResult<()> {
        let WinogradInput { tiling, c, h, w } = *self;
        let (th, tw) = tiling.tiles(h, w);
        let input = &inputs[0];
        ensure!(input.shape() == [1, c, h, w], "input {:?} for {self:?}", input.shape());
        ensure!(output.shape() == [tiling.planes(), c, th * tw], "output {:?} for {self:?}", output.shape());
        let input = input.try_as_plain_ram()?;
        let x = input.as_slice::<f32>()?;
        let mut plain = output.try_as_plain_ram_mut()?;
        let v = plain.as_slice_mut::<f32>()?;
        match tiling {
            Tiling::F2 => transform_input::<F2>(x, c, h, w, v, scratch),
            Tiling::F4 => transform_input::<F4>(x, c, h, w, v, scratch),
        }
        Ok(())
    }
}

/// See [`WinogradInput`]: `x` is `[c, h, w]`, `v` `[A², c, tiles]`.
/// `scratch` holds the rows of one tile row's first pass.
fn transform_input<T: Minimal>(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    v: &mut [f32],
    scratch: &mut Scratch,
) {
    let (m, a) = (T::M, T::A);
    let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
    let plane = c * th * tw;
    // The A rows combined down the tile (`Bᵀ d`), each with a zero on the left and
    // zeros past the right edge, so that tile `tx` reads columns `m·tx..m·tx + A`.
    let padded = m * tw + 2;
    // (Zeroed: the padding is never written.)
    let (rows, zero) = scratch.zeroed(a * padded + w).split_at_mut(a * padded);
    let zero = &*zero;
    for ci in 0..c {
        let image = &x[ci * h * w..][..h * w];
        for ty in 0..th {
            let input_rows: [&[f32]; 6] = std::array::from_fn(|k| match (m * ty + k).checked_sub(1) {
                Some(y) if k < a && y < h => &image[y * w..][..w],
                _ => zero,
            });
            for x in 0..w {
                let d: [f32; 6] = std::array::from_fn(|k| if k < a { input_rows[k][x] } else { 0.0 });
                let s = T::input(&d);
                for (i, value) in s.iter().take(a).enumerate() {
                    rows[i * padded + 1 + x] = *value;
                }
            }
            // Across the tile (`(Bᵀ d) B`), into the planes.
            for (i, s) in rows.chunks_exact(padded).enumerate() {
                let at = (i * a * c + ci) * th * tw + ty * tw;
                for tx in 0..tw {
                    let p = &s[m * tx..][..a];
                    let d: [f32; 6] = std::array::from_fn(|k| if k < a { p[k] } else { 0.0 });
                    let e = T::input(&d);
                    for (j, value) in e.iter().take(a).enumerate() {
                        v[at + j * plane + tx] = *value;
                    }
                }
            }
        }
    }
}

impl TypedOp for WinogradInput {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let WinogradInput { tiling, c, h, w } = *self;
        ensure!(inputs.len() == 1 && inputs[0].shape.as_concrete() == Some(&[1, c, h, w][..]));
        let (th, tw) = tiling.tiles(h, w);
        Ok(tvec!(f32::fact([tiling.planes(), c, th * tw])))
    }

    as_op!();
}

/// `Aᵀ m A` of every tile's products plus the bias, through the LeakyRelu when there is
/// one: `[(m+2)², c, tiles]` → `[1, c, h, w]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WinogradOutput {
    tiling: Tiling,
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
        let act = activation_info(self.alpha_bits);
        Ok(vec![format!("{:?}, {} channels over {}×{}{act}", self.tiling, self.c, self.h, self.w)])
    }

    op_as_typed_op!();
}

impl EvalOp for WinogradOutput {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_alone(self, &inputs)
    }
}

impl EvalInto for WinogradOutput {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, scratch: &mut Scratch) -> TractResult<()> {
        let (tiling, c, h, w) = (self.tiling, self.c, self.h, self.w);
        let (th, tw) = tiling.tiles(h, w);
        let input = &inputs[0];
        ensure!(input.shape() == [tiling.planes(), c, th * tw], "input {:?} for {self:?}", input.shape());
        ensure!(output.shape() == [1, c, h, w], "output {:?} for {self:?}", output.shape());
        let input = input.try_as_plain_ram()?;
        let m = input.as_slice::<f32>()?;
        let mut plain = output.try_as_plain_ram_mut()?;
        let y = plain.as_slice_mut::<f32>()?;
        // The leaky slope, or 1 (the identity) without the activation.
        let alpha = self.alpha_bits.map_or(1.0, f32::from_bits);
        let bias = bytemuck_f32(&self.bias);
        match tiling {
            Tiling::F2 => transform_output::<F2>(m, c, h, w, bias, alpha, y, scratch),
            Tiling::F4 => transform_output::<F4>(m, c, h, w, bias, alpha, y, scratch),
        }
        Ok(())
    }
}

/// See [`WinogradOutput`]: `m` is `[A², c, tiles]`, `y` `[c, h, w]`. A row of tiles at
/// a time, each step a loop over the row's tiles that reads and writes runs of
/// consecutive values (vector loads and stores).
#[allow(clippy::too_many_arguments)] // the layer's geometry, its parameters, the memory
fn transform_output<T: Minimal>(
    m: &[f32],
    c: usize,
    h: usize,
    w: usize,
    bias: &[f32],
    alpha: f32,
    y: &mut [f32],
    scratch: &mut Scratch,
) {
    let (mo, a) = (T::M, T::A);
    let (th, tw) = (h.div_ceil(mo), w.div_ceil(mo));
    let plane = c * th * tw;
    // `Aᵀ m` of the row's tiles: `down[(r * A + j) * tw + tx]`.
    // M output rows of whole tiles, cut to the image's size at its edges: `rows`. (Both
    // written in full before they are read.)
    let width = mo * tw;
    let (down, rows) = scratch.floats(mo * a * tw + mo * width).split_at_mut(mo * a * tw);
    for co in 0..c {
        let b = bias[co];
        let out = &mut y[co * h * w..][..h * w];
        for ty in 0..th {
            let at = co * th * tw + ty * tw;
            // Down each of the A columns of every tile.
            for j in 0..a {
                let col: [&[f32]; 6] =
                    std::array::from_fn(|i| &m[(i.min(a - 1) * a + j) * plane + at..][..tw]);
                // Row r of column j's results (rows past M empty).
                let mut outs: [&mut [f32]; 4] = {
                    let mut it = down.chunks_exact_mut(a * tw).map(|r| &mut r[j * tw..][..tw]);
                    std::array::from_fn(|_| it.next().unwrap_or_default())
                };
                for tx in 0..tw {
                    let v: [f32; 6] = std::array::from_fn(|i| if i < a { col[i][tx] } else { 0.0 });
                    let u = T::output(&v);
                    for (r, o) in outs.iter_mut().enumerate().take(mo) {
                        o[tx] = u[r];
                    }
                }
            }
            // Across each of the M rows of every tile.
            for r in 0..mo {
                let u: [&[f32]; 6] = std::array::from_fn(|j| &down[(r * a + j.min(a - 1)) * tw..][..tw]);
                let row = &mut rows[r * width..][..width];
                for tx in 0..tw {
                    let v: [f32; 6] = std::array::from_fn(|j| if j < a { u[j][tx] } else { 0.0 });
                    let e = T::output(&v);
                    for s in 0..mo {
                        let value = e[s] + b;
                        row[mo * tx + s] = if value < 0.0 { value * alpha } else { value };
                    }
                }
            }
            for r in 0..mo.min(h - mo * ty) {
                out[(mo * ty + r) * w..][..w].copy_from_slice(&rows[r * width..][..w]);
            }
        }
    }
}

impl TypedOp for WinogradOutput {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (th, tw) = self.tiling.tiles(self.h, self.w);
        let shape = [self.tiling.planes(), self.c, th * tw];
        ensure!(inputs.len() == 1 && inputs[0].shape.as_concrete() == Some(&shape[..]));
        Ok(tvec!(f32::fact([1, self.c, self.h, self.w])))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "onnx")]
    use crate::direct_conv::tests::{assert_same_outputs, float_model};
    use crate::direct_conv::tests::{close_within, one_conv, ops, run, values};

    #[test]
    fn computes_what_tracts_convolution_computes() {
        // Sides that are a whole number of tiles of either size and sides that are not,
        // one tile, a 1×1 image, channels of every size.
        let shapes = [
            (3, 5, 9, 8),
            (16, 16, 13, 13),
            (5, 7, 6, 26),
            (8, 64, 4, 52),
            (2, 3, 1, 1),
            (7, 2, 2, 3),
            (4, 6, 12, 7),
            (64, 64, 26, 26),
            (1, 1, 5, 7),
            (16, 1, 9, 9),
        ];
        for tiling in [Tiling::F2, Tiling::F4] {
            for (c_in, c_out, h, w) in shapes {
                for leaky in [false, true] {
                    let what = format!("{tiling:?}, {c_in}→{c_out} over {h}×{w}, LeakyRelu {leaky}");
                    let input = Tensor::from_shape(&[1, c_in, h, w], &values(c_in * h * w, 3)).unwrap();
                    let tracts = one_conv(c_in, c_out, h, w, 1, leaky);
                    let mut ours = tracts.clone();
                    assert_eq!(winograd_where(&mut ours, |_| Some(tiling)).unwrap(), 1, "{what}");
                    let names = ops(&ours);
                    assert!(names.iter().any(|n| n == "DeskcamWinogradOutput"), "{what}: {names:?}");
                    assert!(
                        !names.iter().any(|n| n == "Conv" || n.contains("LeakyRelu")),
                        "{what}: {names:?}"
                    );
                    // The same sums in another order (and F(4×4)'s fractions): within
                    // 1e-5 of the output's largest value.
                    close_within(&run(ours, &input), &run(tracts, &input), 1e-5, &what);
                }
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
            assert_eq!(winograd_f32_convolutions(&mut ours).unwrap(), taken, "{what}");
        }
    }

    /// The shipped float model with its 16 convolutions of 64 or more channels done this
    /// way: its outputs those of tract's plan within the tolerance of another order of
    /// sums.
    #[cfg(feature = "onnx")]
    #[test]
    fn the_float_model_computes_the_same_with_it() {
        let tracts = float_model();
        let mut ours = tracts.clone();
        // The NanoDet of models/: 24 of its 34 convolutions are 3×3 at stride 1, 16 of
        // these with 64 or more output channels (see `worth_it`), 2 over 52×52 (F(4×4))
        // and 14 over 26×26 or 13×13 (F(2×2)).
        assert_eq!(winograd_where(&mut ours, |g| many_channels(g).then(|| tiling_for(g))).unwrap(), 16);
        let f4 = ours
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<WinogradInput>())
            .filter(|op| op.tiling == Tiling::F4);
        assert_eq!(f4.count(), 2);
        assert_same_outputs(tracts, ours);
    }
}
