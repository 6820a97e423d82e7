//! A direct 3×3 convolution for the float model's layers with few channels, put into the model
//! in place of tract's `Conv` before it is optimised.
//!
//! tract runs a float convolution as a matrix product over patches it gathers lazily:
//! each element of a panel is one load through an offset table. Where the layer has few
//! output channels (16 or 32 over the 104×104 grid of the 416 input) a gathered element
//! feeds only 16 or 32 multiply-adds, so the gathering costs about as much as the
//! arithmetic, and tract also copies the input into a zero-padded tensor first
//! (`MODEL_CARD.md`, "fp32 on x86 against onnxruntime"). This op reads the input where
//! it lies: an output row of four channels is a sum, over the input channels and the
//! three kernel rows and columns, of an input row shifted by one pixel at most, times
//! one weight per output channel. Rows are done a few vectors at a time with the
//! accumulators in registers; the zero padding is the missing kernel rows at the top and
//! bottom, and a lane shifted in at the row's two ends. The layer's LeakyRelu, when it
//! follows, is applied before the store.
//!
//! At stride 2 (the network's first layer: 3→32 channels over the 416×416 input, where
//! tract's own direct convolution took 2.6 ms and its LeakyRelu 0.4 ms more on x86) each
//! input row is first split into its even and odd columns, so that the three taps of a
//! row are again loads of consecutive values; the padding is a zero before the odd ones.
//!
//! The sums are taken in another order than tract's, so outputs differ in the last bits
//! (a test holds them to tract's within a relative 1e-5).

use std::sync::Arc;

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_nnef::tract_core::ops::element_wise::ElementWiseOp;
use tract_nnef::tract_core::ops::nn::{DataFormat, LeakyRelu};

use crate::reuse::{eval_alone, EvalInto, Scratch};

/// Output channels done together: the weights of one input tap for them are one vector
/// on aarch64 (each used by lane) and four broadcasts on x86.
const BLOCK: usize = 4;

/// Replaces each float `Conv` of the (decluttered) model that this op covers, with the
/// `LeakyRelu` that alone reads its output when there is one. Returns how many it
/// replaced; none on a machine without the vector instructions it is written for.
pub fn direct_f32_convolutions(model: &mut TypedModel) -> TractResult<usize> {
    if !kernel_available() {
        return Ok(0);
    }
    replace_conv3x3(
        model,
        "deskcam-direct-conv",
        |g| worth_it(g).then_some(()),
        |patch, c, (), x| {
            let (taps, bias) = pack(c);
            let op = DirectConv3x3 {
                geometry: c.geometry,
                taps: Arc::new(taps.into_iter().map(f32::to_bits).collect()),
                bias: Arc::new(bias.into_iter().map(f32::to_bits).collect()),
                alpha_bits: c.alpha.map(f32::to_bits),
            };
            Ok(patch.wire_node(&c.name, op, &[x])?[0])
        },
    )
}

/// A float 3×3 convolution as [`covered`] takes it (Winograd at stride 1 only).
pub(crate) struct Conv3x3 {
    pub name: String,
    pub geometry: Geometry,
    /// `[c_out][c_in][3][3]`.
    pub kernel: Vec<f32>,
    /// One per output channel (the model may give one for all).
    pub bias: Vec<f32>,
    /// The slope of the LeakyRelu that alone reads the convolution's output, if any.
    pub alpha: Option<f32>,
}

/// Replaces each float `Conv` of the (decluttered) model that is a [`Conv3x3`] and that
/// `take` accepts (with its LeakyRelu) by what `wire` puts into the patch from the
/// convolution's input, given what `take` chose for it. Returns how many it replaced.
pub(crate) fn replace_conv3x3<T>(
    model: &mut TypedModel,
    patch_name: &str,
    take: impl Fn(&Geometry) -> Option<T>,
    wire: impl Fn(&mut TypedModelPatch, &Conv3x3, T, OutletId) -> TractResult<OutletId>,
) -> TractResult<usize> {
    let mut replaced = 0;
    // Each patch leaves the replaced nodes unconnected: the candidates are taken first,
    // and the model compacted at the end.
    let convs: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Conv>()).map(|n| n.id).collect();
    for id in convs {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else { continue };
        let Some(geometry) = covered(model, node, conv)? else { continue };
        let Some(choice) = take(&geometry) else { continue };
        let kernel = model.outlet_fact(node.inputs[1])?.konst.clone();
        let bias = model.outlet_fact(node.inputs[2])?.konst.clone();
        let (Some(kernel), Some(bias)) = (kernel, bias) else { continue };
        let (kernel, bias) = (kernel_values(&kernel, &geometry)?, bias_per_channel(&bias, geometry.c_out)?);
        // The activation that alone reads the convolution's output goes in with it.
        let succ = &node.outputs[0].successors;
        let leaky = match &succ[..] {
            [one] if !model.output_outlets()?.contains(&OutletId::new(id, 0)) => model
                .node(one.node)
                .op_as::<ElementWiseOp>()
                .and_then(|e| e.0.downcast_ref::<LeakyRelu>())
                .map(|l| (one.node, l.alpha)),
            _ => None,
        };
        let conv = Conv3x3 { name: node.name.clone(), geometry, kernel, bias, alpha: leaky.map(|l| l.1) };
        let mut patch = TypedModelPatch::new(patch_name);
        let x = patch.tap_model(model, node.inputs[0])?;
        let out = wire(&mut patch, &conv, choice, x)?;
        let replaced_outlet = OutletId::new(leaky.map_or(id, |(l, _)| l), 0);
        patch.shunt_outside(model, replaced_outlet, out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The shapes of a convolution this op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Geometry {
    pub c_in: usize,
    pub c_out: usize,
    /// The input's.
    pub h: usize,
    pub w: usize,
    /// 1 or 2, the same down and across.
    pub stride: usize,
}

impl Geometry {
    /// The output's height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.h.div_ceil(self.stride), self.w.div_ceil(self.stride))
    }
}

/// Whether `conv` is a [`Conv3x3`]: float, NCHW with one image, no groups, a 3×3 kernel
/// in OIHW without dilation, at stride 1 with one pixel of zero padding on every side or
/// at stride 2 with one at the top and left (and what the bottom and right need, if
/// anything).
fn covered(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Geometry>> {
    let input = model.outlet_fact(node.inputs[0])?;
    let spec = &conv.pool_spec;
    let Some(shape) = input.shape.as_concrete() else { return Ok(None) };
    if input.datum_type != f32::datum_type()
        || conv.q_params.is_some()
        || node.inputs.len() != 3
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || shape.len() != 4
        || shape[0] != 1
        || spec.kernel_shape.as_slice() != [3, 3]
        || (0..2).any(|a| spec.dilation(a) != 1)
    {
        return Ok(None);
    }
    let (h, w, stride) = (shape[2], shape[3], spec.stride(0));
    let padding = spec.computed_padding(&[h, w]);
    let taken = match stride {
        1 => padding.iter().all(|p| p.pad_before == 1 && p.pad_after == 1 && p.convoluted == p.deconvoluted),
        2 => padding.iter().zip([h, w]).all(|(p, d)| p.pad_before == 1 && p.convoluted == d.div_ceil(2)),
        _ => false,
    };
    if !taken || spec.stride(1) != stride {
        return Ok(None);
    }
    Ok(Some(Geometry { c_in: shape[1], c_out: conv.output_channels(), h, w, stride }))
}

/// Where this op is faster than tract's product. x86 (AVX2, `deskcam bench --profile`,
/// alternating runs): with 16 or 32 output channels it takes 0.42–0.88 of tract's time
/// (tract's gathered patches feed too few channels there); with 64 or more, 1.16–1.56
/// (tract's 16×6 kernel reuses its loads better than this one's 4 channels × 2
/// vectors). On aarch64 nothing is replaced until it is measured on the boards' cores:
/// `DESKCAM_DIRECT_CONV=1` replaces the same layers as on x86, for that measurement.
fn worth_it(g: &Geometry) -> bool {
    // Rows at least a vector wide, and two of them at stride 1.
    if g.out_hw().1 < lanes() || (g.stride == 1 && g.h < 2) {
        return false;
    }
    let few_channels = g.c_out <= 32;
    if cfg!(target_arch = "aarch64") {
        return few_channels && std::env::var_os("DESKCAM_DIRECT_CONV").is_some();
    }
    few_channels
}

/// The weights in blocks of [`BLOCK`] output channels, each block `[ci][ky][kx][o]`
/// (a missing channel of the last block is zeros), and the bias in as many channels.
fn pack(c: &Conv3x3) -> (Vec<f32>, Vec<f32>) {
    let Geometry { c_in, c_out, .. } = c.geometry;
    let k = &c.kernel;
    let blocks = c_out.div_ceil(BLOCK);
    let mut taps = vec![0f32; blocks * c_in * 9 * BLOCK];
    for co in 0..c_out {
        let (b, o) = (co / BLOCK, co % BLOCK);
        for ci in 0..c_in {
            for t in 0..9 {
                taps[((b * c_in + ci) * 9 + t) * BLOCK + o] = k[(co * c_in + ci) * 9 + t];
            }
        }
    }
    let mut padded = c.bias.clone();
    padded.resize(blocks * BLOCK, 0.0);
    (taps, padded)
}

/// The kernel's values, `[c_out][c_in][3][3]`.
fn kernel_values(kernel: &Tensor, g: &Geometry) -> TractResult<Vec<f32>> {
    let kernel = kernel.cast_to::<f32>()?;
    let kernel = kernel.try_as_plain_ram()?;
    let k = kernel.as_slice::<f32>()?;
    ensure!(k.len() == g.c_out * g.c_in * 9, "kernel of {} values for {}×{}×3×3", k.len(), g.c_out, g.c_in);
    Ok(k.to_vec())
}

/// The bias as one value per output channel (the model may give one for all).
fn bias_per_channel(bias: &Tensor, c_out: usize) -> TractResult<Vec<f32>> {
    let bias = bias.cast_to::<f32>()?;
    let bias = bias.try_as_plain_ram()?;
    let bias = bias.as_slice::<f32>()?;
    match bias.len() {
        1 => Ok(vec![bias[0]; c_out]),
        n if n == c_out => Ok(bias.to_vec()),
        n => bail!("bias of {n} values for {c_out} channels"),
    }
}

/// A 3×3 convolution as [`covered`] takes it (stride 1 or 2), optionally followed by a
/// LeakyRelu, over `[1, c_in, h, w]` floats.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DirectConv3x3 {
    geometry: Geometry,
    /// See [`pack`].
    taps: Arc<Vec<u32>>,
    bias: Arc<Vec<u32>>,
    /// The LeakyRelu's slope (its bits), when it is part of the op.
    alpha_bits: Option<u32>,
}

impl Op for DirectConv3x3 {
    fn name(&self) -> StaticName {
        "DeskcamDirectConv3x3".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let Geometry { c_in, c_out, h, w, stride } = self.geometry;
        let act = activation_info(self.alpha_bits);
        let at = if stride == 1 { String::new() } else { format!(" at stride {stride}") };
        Ok(vec![format!("{c_in}→{c_out} channels over {h}×{w}{at}{act}")])
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv3x3 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_alone(self, &inputs)
    }
}

impl EvalInto for DirectConv3x3 {
    fn eval_into(&self, inputs: &[TValue], output: &mut Tensor, scratch: &mut Scratch) -> TractResult<()> {
        let Geometry { c_in, c_out, h, w, stride } = self.geometry;
        let (oh, ow) = self.geometry.out_hw();
        let input = &inputs[0];
        ensure!(input.shape() == [1, c_in, h, w], "input {:?} for {:?}", input.shape(), self.geometry);
        ensure!(output.shape() == [1, c_out, oh, ow], "output {:?} for {:?}", output.shape(), self.geometry);
        let input = input.try_as_plain_ram()?;
        let x = input.as_slice::<f32>()?;
        // At stride 2 the kernel reads each row's even and odd columns apart.
        let (x, pitch) = if stride == 2 { even_and_odd_columns(x, c_in, h, w, scratch) } else { (x, w) };
        let mut plain = output.try_as_plain_ram_mut()?;
        let out = plain.as_slice_mut::<f32>()?;
        let alpha = self.alpha_bits.map(f32::from_bits);
        let taps: &[f32] = bytemuck_f32(&self.taps);
        let bias: &[f32] = bytemuck_f32(&self.bias);
        // Blocks of output channels split across tract's executor (one thread unless the
        // board's `model.threads` says more); each writes only its own channels.
        // (Held inline for up to 8 blocks, the 32 channels `worth_it` takes: no allocation
        // per inference; the output and the split rows are the pool's.)
        let blocks = c_out.div_ceil(BLOCK);
        let mut ids: tract_smallvec::SmallVec<[usize; 8]> = (0..blocks).collect();
        let out_ptr = SharedOut(out.as_mut_ptr());
        tract_linalg::multithread::par_chunks_mut(&mut ids, 1, c_out * oh * ow * c_in * 9, |_, chunk| {
            for &b in chunk.iter() {
                let channels = BLOCK.min(c_out - b * BLOCK);
                let args = Block {
                    input: x,
                    pitch,
                    geometry: self.geometry,
                    taps: &taps[b * c_in * 9 * BLOCK..][..c_in * 9 * BLOCK],
                    bias: &bias[b * BLOCK..][..BLOCK],
                    channels,
                    alpha,
                };
                // SAFETY: the block's channels of `out` (`[b*BLOCK, b*BLOCK+channels)`,
                // each oh×ow) are within `out` and written by this call alone.
                unsafe { run_block(&args, out_ptr.get().add(b * BLOCK * oh * ow)) };
            }
            Ok(())
        })
    }
}

impl TypedOp for DirectConv3x3 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Geometry { c_in, c_out, h, w, .. } = self.geometry;
        let (oh, ow) = self.geometry.out_hw();
        ensure!(inputs.len() == 1 && inputs[0].shape.as_concrete() == Some(&[1, c_in, h, w][..]));
        Ok(tvec!(f32::fact([1, c_out, oh, ow])))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let Geometry { c_in, c_out, .. } = self.geometry;
        let (oh, ow) = self.geometry.out_hw();
        Ok(tvec!((Cost::FMA(f32::datum_type()), (c_out * c_in * 9 * oh * ow).to_dim())))
    }

    as_op!();
}

/// How an op's info names the LeakyRelu it includes (its slope's bits), if any.
pub(crate) fn activation_info(alpha_bits: Option<u32>) -> String {
    alpha_bits.map(|a| format!(", LeakyRelu {}", f32::from_bits(a))).unwrap_or_default()
}

/// The output pointer, shared by the blocks that each write their own channels.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every user writes a disjoint range (see `eval`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

pub(crate) fn bytemuck_f32(bits: &[u32]) -> &[f32] {
    // SAFETY: u32 and f32 have the same size and alignment, and every bit pattern is an
    // f32.
    unsafe { std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len()) }
}

/// For a convolution at stride 2, each input row as its even columns and then its odd
/// columns after one zero (the padding), each in a row of `pitch` floats (zeros past
/// the end): output pixel `x` then reads odd `x`, even `x` and odd `x + 1`, consecutive
/// values for consecutive pixels. `[c][h][2][pitch]`, and the pitch.
fn even_and_odd_columns<'s>(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    scratch: &'s mut Scratch,
) -> (&'s [f32], usize) {
    // Odd `ow` is the last one read (a vector placed at `ow - N` reads up to it).
    let pitch = w.div_ceil(2) + 1;
    let rows = scratch.zeroed(c * h * 2 * pitch);
    for (row, split) in x.chunks_exact(w).zip(rows.chunks_exact_mut(2 * pitch)) {
        let (even, odd) = split.split_at_mut(pitch);
        for (j, pair) in row.chunks(2).enumerate() {
            even[j] = pair[0];
            if let Some(&v) = pair.get(1) {
                odd[j + 1] = v;
            }
        }
    }
    (rows, pitch)
}

/// One block of output channels: what [`run_block`] computes.
struct Block<'a> {
    /// The input, `[c_in][h][w]`; at stride 2 as [`even_and_odd_columns`] splits it.
    input: &'a [f32],
    /// The floats from one input row to the next (at stride 2, from one half-row).
    pitch: usize,
    geometry: Geometry,
    /// `[c_in][3][3][BLOCK]`.
    taps: &'a [f32],
    /// `BLOCK` values.
    bias: &'a [f32],
    /// How many of the block's channels exist (the last block may have fewer).
    channels: usize,
    alpha: Option<f32>,
}

/// The vector operations the convolution is written in.
trait Simd {
    /// A vector of [`Simd::N`] floats.
    type V: Copy;
    /// One tap's weights for the [`BLOCK`] channels.
    type W: Copy;
    const N: usize;
    /// Vectors per row done together (with [`BLOCK`] channels: the accumulators).
    const TILE: usize;
    unsafe fn splat(v: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `[0, v0, .., v(N-2)]`: the row's left neighbours at its first pixel.
    unsafe fn shift_in_left(v: Self::V) -> Self::V;
    /// `[v1, .., v(N-1), 0]`: the row's right neighbours at its last pixel.
    unsafe fn shift_in_right(v: Self::V) -> Self::V;
    unsafe fn weights(p: *const f32) -> Self::W;
    unsafe fn lane<const R: i32>(w: Self::W) -> Self::V;
    unsafe fn fma(acc: Self::V, x: Self::V, w: Self::V) -> Self::V;
    unsafe fn leaky(v: Self::V, alpha: f32) -> Self::V;
}

fn lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    return <x86::Avx2 as Simd>::N;
    #[cfg(target_arch = "aarch64")]
    return <arm::Neon as Simd>::N;
    #[allow(unreachable_code)]
    usize::MAX
}

fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(target_arch = "aarch64")]
    return true;
    #[allow(unreachable_code)]
    false
}

/// # Safety
/// `out` is valid for `b.channels` planes of the output's `oh×ow` floats; the kernel is
/// available.
unsafe fn run_block(b: &Block, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::run(b, out)
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        arm::run(b, out)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    unreachable!("direct_f32_convolutions replaces nothing here: {:p} {}", out, b.channels)
}

/// Every row of one block, in tiles of up to `S::TILE` vectors; the tiles at the row's
/// ends take their neighbours from the shifted loads.
#[inline(always)]
unsafe fn block_rows<S: Simd>(b: &Block, out: *mut f32) {
    let Geometry { h, w, .. } = b.geometry;
    let n_vec = w.div_ceil(S::N);
    for y in 0..h {
        let mut v0 = 0;
        while v0 < n_vec {
            let nv = S::TILE.min(n_vec - v0);
            let (left, right) = (v0 == 0, v0 + nv == n_vec);
            let t = Tile { y, x0: v0 * S::N };
            unsafe {
                match (nv, left, right) {
                    (1, l, r) => tile_ends::<S, 1>(b, &t, out, l, r),
                    (2, l, r) => tile_ends::<S, 2>(b, &t, out, l, r),
                    (3, l, r) => tile_ends::<S, 3>(b, &t, out, l, r),
                    (4, l, r) => tile_ends::<S, 4>(b, &t, out, l, r),
                    (5, l, r) => tile_ends::<S, 5>(b, &t, out, l, r),
                    _ => unreachable!("TILE is at most 5"),
                }
            }
            v0 += nv;
        }
    }
}

struct Tile {
    y: usize,
    /// The first vector's first pixel.
    x0: usize,
}

#[inline(always)]
unsafe fn tile_ends<S: Simd, const NV: usize>(b: &Block, t: &Tile, out: *mut f32, left: bool, right: bool) {
    unsafe {
        match (left, right) {
            (false, false) => tile::<S, NV, false, false>(b, t, out),
            (true, false) => tile::<S, NV, true, false>(b, t, out),
            (false, true) => tile::<S, NV, false, true>(b, t, out),
            (true, true) => tile::<S, NV, true, true>(b, t, out),
        }
    }
}

/// `NV` vectors of output row `t.y` for the block's channels. `L`: the first vector is the
/// row's first (its left neighbour at pixel 0 is padding); `R`: the last vector is the
/// row's last, placed at `w - N` (it may overlap the one before it, which then computes
/// the same values).
#[inline(always)]
unsafe fn tile<S: Simd, const NV: usize, const L: bool, const R: bool>(b: &Block, t: &Tile, out: *mut f32) {
    let Geometry { c_in, h, w, .. } = b.geometry;
    let xs: [usize; NV] = std::array::from_fn(|v| if R && v == NV - 1 { w - S::N } else { t.x0 + v * S::N });
    // The kernel rows that fall inside the image.
    let ky_lo = usize::from(t.y == 0);
    let ky_hi = if t.y + 1 == h { 2 } else { 3 };
    unsafe {
        let mut acc: [[S::V; NV]; BLOCK] = std::array::from_fn(|r| [S::splat(b.bias[r]); NV]);
        let x = b.input.as_ptr();
        let taps = b.taps.as_ptr();
        for ci in 0..c_in {
            for ky in ky_lo..ky_hi {
                let row = x.add(ci * h * w + (t.y + ky - 1) * w);
                for kx in 0..3 {
                    let xv: [S::V; NV] = std::array::from_fn(|v| {
                        if L && v == 0 && kx == 0 {
                            S::shift_in_left(S::load(row))
                        } else if R && v == NV - 1 && kx == 2 {
                            S::shift_in_right(S::load(row.add(w - S::N)))
                        } else {
                            S::load(row.add(xs[v] + kx).sub(1))
                        }
                    });
                    multiply_add::<S, NV>(&mut acc, &xv, taps.add(((ci * 3 + ky) * 3 + kx) * BLOCK));
                }
            }
        }
        store_tile::<S, NV>(b, &acc, out.add(t.y * w), h * w, &xs);
    }
}

/// One tap's `NV` input vectors times its weights for the block's channels (at `taps`),
/// into the accumulators.
#[inline(always)]
unsafe fn multiply_add<S: Simd, const NV: usize>(
    acc: &mut [[S::V; NV]; BLOCK],
    xv: &[S::V; NV],
    taps: *const f32,
) {
    unsafe {
        let wv = S::weights(taps);
        let w0 = S::lane::<0>(wv);
        for v in 0..NV {
            acc[0][v] = S::fma(acc[0][v], xv[v], w0);
        }
        let w1 = S::lane::<1>(wv);
        for v in 0..NV {
            acc[1][v] = S::fma(acc[1][v], xv[v], w1);
        }
        let w2 = S::lane::<2>(wv);
        for v in 0..NV {
            acc[2][v] = S::fma(acc[2][v], xv[v], w2);
        }
        let w3 = S::lane::<3>(wv);
        for v in 0..NV {
            acc[3][v] = S::fma(acc[3][v], xv[v], w3);
        }
    }
}

/// The accumulators, through the LeakyRelu if there is one, into the block's channels:
/// `row` is the output row in the first channel's plane, `plane` the floats per plane,
/// `xs` each vector's first pixel.
#[inline(always)]
unsafe fn store_tile<S: Simd, const NV: usize>(
    b: &Block,
    acc: &[[S::V; NV]; BLOCK],
    row: *mut f32,
    plane: usize,
    xs: &[usize; NV],
) {
    for (r, acc) in acc.iter().enumerate().take(b.channels) {
        for v in 0..NV {
            unsafe {
                let a = match b.alpha {
                    Some(alpha) => S::leaky(acc[v], alpha),
                    None => acc[v],
                };
                S::store(row.add(r * plane + xs[v]), a);
            }
        }
    }
}

/// At stride 2: every output row of one block, in tiles of up to `S::TILE` vectors, from
/// [`even_and_odd_columns`]'s rows (whose zeros are the padding).
#[inline(always)]
unsafe fn block_rows_s2<S: Simd>(b: &Block, out: *mut f32) {
    let (oh, ow) = b.geometry.out_hw();
    let n_vec = ow.div_ceil(S::N);
    for y in 0..oh {
        let mut v0 = 0;
        while v0 < n_vec {
            let nv = S::TILE.min(n_vec - v0);
            let t = Tile { y, x0: v0 * S::N };
            let last = v0 + nv == n_vec;
            unsafe {
                match nv {
                    1 => tile_s2::<S, 1>(b, &t, last, out),
                    2 => tile_s2::<S, 2>(b, &t, last, out),
                    3 => tile_s2::<S, 3>(b, &t, last, out),
                    4 => tile_s2::<S, 4>(b, &t, last, out),
                    5 => tile_s2::<S, 5>(b, &t, last, out),
                    _ => unreachable!("TILE is at most 5"),
                }
            }
            v0 += nv;
        }
    }
}

/// `NV` vectors of output row `t.y` at stride 2. `last`: the last vector is the row's
/// last, placed at `ow - N` (it may overlap the one before it, which then computes the
/// same values).
#[inline(always)]
unsafe fn tile_s2<S: Simd, const NV: usize>(b: &Block, t: &Tile, last: bool, out: *mut f32) {
    let Geometry { c_in, h, .. } = b.geometry;
    let (oh, ow) = b.geometry.out_hw();
    let xs: [usize; NV] =
        std::array::from_fn(|v| if last && v == NV - 1 { ow - S::N } else { t.x0 + v * S::N });
    unsafe {
        let mut acc: [[S::V; NV]; BLOCK] = std::array::from_fn(|r| [S::splat(b.bias[r]); NV]);
        let x = b.input.as_ptr();
        let taps = b.taps.as_ptr();
        for ci in 0..c_in {
            for ky in 0..3 {
                // Input row 2y + ky - 1, when it is inside the image.
                let Some(r) = (2 * t.y + ky).checked_sub(1).filter(|&r| r < h) else { continue };
                let even = x.add((ci * h + r) * 2 * b.pitch);
                let odd = even.add(b.pitch);
                for kx in 0..3 {
                    // Input columns 2x - 1, 2x and 2x + 1.
                    let xv: [S::V; NV] = std::array::from_fn(|v| match kx {
                        0 => S::load(odd.add(xs[v])),
                        1 => S::load(even.add(xs[v])),
                        _ => S::load(odd.add(xs[v] + 1)),
                    });
                    multiply_add::<S, NV>(&mut acc, &xv, taps.add(((ci * 3 + ky) * 3 + kx) * BLOCK));
                }
            }
        }
        store_tile::<S, NV>(b, &acc, out.add(t.y * ow), oh * ow, &xs);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Block, Simd};

    /// AVX2 and FMA: 8 floats a vector, 2 vectors × 4 channels of accumulators (8 of
    /// the 16 registers). With 3 vectors (12 accumulators, the 3 inputs and a weight)
    /// the compiler kept one accumulator on the stack, and the chain of stores and loads
    /// through it halved the speed.
    pub struct Avx2;

    impl Simd for Avx2 {
        type V = __m256;
        type W = *const f32;
        const N: usize = 8;
        const TILE: usize = 2;
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m256 {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn shift_in_left(v: __m256) -> __m256 {
            unsafe {
                let rotated = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6));
                _mm256_blend_ps::<0b0000_0001>(rotated, _mm256_setzero_ps())
            }
        }
        #[inline(always)]
        unsafe fn shift_in_right(v: __m256) -> __m256 {
            unsafe {
                let rotated = _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0));
                _mm256_blend_ps::<0b1000_0000>(rotated, _mm256_setzero_ps())
            }
        }
        #[inline(always)]
        unsafe fn weights(p: *const f32) -> *const f32 {
            p
        }
        #[inline(always)]
        unsafe fn lane<const R: i32>(w: *const f32) -> __m256 {
            unsafe { _mm256_broadcast_ss(&*w.add(R as usize)) }
        }
        #[inline(always)]
        unsafe fn fma(acc: __m256, x: __m256, w: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(x, w, acc) }
        }
        #[inline(always)]
        unsafe fn leaky(v: __m256, alpha: f32) -> __m256 {
            unsafe {
                let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_setzero_ps());
                _mm256_blendv_ps(_mm256_mul_ps(v, _mm256_set1_ps(alpha)), v, positive)
            }
        }
    }

    /// # Safety
    /// As [`super::run_block`], on a machine with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn run(b: &Block, out: *mut f32) {
        unsafe {
            match b.geometry.stride {
                2 => super::block_rows_s2::<Avx2>(b, out),
                _ => super::block_rows::<Avx2>(b, out),
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::{Block, Simd};

    /// NEON: 4 floats a vector, 5 vectors × 4 channels of accumulators (20 of the 32
    /// registers); each tap's 4 weights are one register, used by lane.
    pub struct Neon;

    impl Simd for Neon {
        type V = float32x4_t;
        type W = float32x4_t;
        const N: usize = 4;
        const TILE: usize = 5;
        #[inline(always)]
        unsafe fn splat(v: f32) -> float32x4_t {
            unsafe { vdupq_n_f32(v) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> float32x4_t {
            unsafe { vld1q_f32(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: float32x4_t) {
            unsafe { vst1q_f32(p, v) }
        }
        #[inline(always)]
        unsafe fn shift_in_left(v: float32x4_t) -> float32x4_t {
            unsafe { vextq_f32::<3>(vdupq_n_f32(0.0), v) }
        }
        #[inline(always)]
        unsafe fn shift_in_right(v: float32x4_t) -> float32x4_t {
            unsafe { vextq_f32::<1>(v, vdupq_n_f32(0.0)) }
        }
        #[inline(always)]
        unsafe fn weights(p: *const f32) -> float32x4_t {
            unsafe { vld1q_f32(p) }
        }
        #[inline(always)]
        unsafe fn lane<const R: i32>(w: float32x4_t) -> float32x4_t {
            unsafe { vdupq_laneq_f32::<R>(w) }
        }
        #[inline(always)]
        unsafe fn fma(acc: float32x4_t, x: float32x4_t, w: float32x4_t) -> float32x4_t {
            unsafe { vfmaq_f32(acc, x, w) }
        }
        #[inline(always)]
        unsafe fn leaky(v: float32x4_t, alpha: f32) -> float32x4_t {
            unsafe {
                let positive = vcgtq_f32(v, vdupq_n_f32(0.0));
                vbslq_f32(positive, v, vmulq_n_f32(v, alpha))
            }
        }
    }

    /// # Safety
    /// As [`super::run_block`].
    pub unsafe fn run(b: &Block, out: *mut f32) {
        unsafe {
            match b.geometry.stride {
                2 => super::block_rows_s2::<Neon>(b, out),
                _ => super::block_rows::<Neon>(b, out),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tract_nnef::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_nnef::tract_core::ops::nn::leaky_relu;

    /// Deterministic values in [-1, 1).
    pub(crate) fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + seed) * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    /// A model of one 3×3 convolution (stride 1, `pad` on every side), optionally
    /// followed by a LeakyRelu, as the decluttered NanoDet has them.
    pub(crate) fn one_conv(
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        pad: usize,
        leaky: bool,
    ) -> TypedModel {
        strided_conv(c_in, c_out, h, w, pad, 1, leaky)
    }

    /// [`one_conv`] at `stride`.
    pub(crate) fn strided_conv(
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
        pad: usize,
        stride: usize,
        leaky: bool,
    ) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, c_in, h, w])).unwrap();
        let kernel = Tensor::from_shape(&[c_out, c_in, 3, 3], &values(c_out * c_in * 9, 1)).unwrap();
        let bias = Tensor::from_shape(&[c_out], &values(c_out, 2)).unwrap();
        let kernel = model.add_const("k", kernel).unwrap();
        let bias = model.add_const("b", bias).unwrap();
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Explicit(tvec![pad, pad], tvec![pad, pad]),
                dilations: None,
                strides: Some(tvec![stride, stride]),
                input_channels: c_in,
                output_channels: c_out,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let mut y = model.wire_node("conv", conv, &[x, kernel, bias]).unwrap()[0];
        if leaky {
            y = model.wire_node("act", leaky_relu(0.1), &[y]).unwrap()[0];
        }
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    pub(crate) fn run(model: TypedModel, input: &Tensor) -> Tensor {
        run_all(model, input).remove(0)
    }

    /// Every output of `model`, optimised, on `input`.
    pub(crate) fn run_all(model: TypedModel, input: &Tensor) -> Vec<Tensor> {
        let out = model.into_optimized().unwrap().into_runnable().unwrap();
        out.run(tvec!(input.clone().into_tvalue())).unwrap().into_iter().map(|v| v.into_tensor()).collect()
    }

    pub(crate) fn ops(model: &TypedModel) -> Vec<String> {
        model.nodes().iter().map(|n| n.op.name().to_string()).collect()
    }

    /// Holds `ours` to `tracts` within a relative 1e-5 of the output's largest value: the
    /// same sums in another order.
    pub(crate) fn close(ours: &Tensor, tracts: &Tensor, what: &str) {
        close_within(ours, tracts, 1e-5, what)
    }

    /// Holds `ours` to `tracts` within `relative` of the output's largest value.
    pub(crate) fn close_within(ours: &Tensor, tracts: &Tensor, relative: f32, what: &str) {
        assert_eq!(ours.shape(), tracts.shape(), "{what}");
        let (a, b) = (ours.try_as_plain_ram().unwrap(), tracts.try_as_plain_ram().unwrap());
        let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        // (A NaN, from a value never written, say, counts as the worst difference.)
        let diff = |(x, y): (&f32, &f32)| if (x - y).is_nan() { f32::INFINITY } else { (x - y).abs() };
        let worst = a.iter().zip(b).map(diff).fold(0f32, f32::max);
        assert!(worst <= relative * scale, "{what}: differs by {worst} (largest value {scale})");
    }

    #[test]
    fn computes_what_tracts_convolution_computes() {
        if !kernel_available() {
            eprintln!("no vector kernel on this machine: nothing to compare");
            return;
        }
        // Rows of one vector, a few, a tile and a half; rows that are not a whole number
        // of vectors (the last one overlaps); channels that are not a whole block.
        for (c_in, c_out, h, w) in [
            (3, 5, 9, 8),
            (16, 16, 13, 13),
            (5, 7, 6, 26),
            (8, 4, 4, 52),
            (2, 9, 2, 104),
            (4, 3, 5, 17),
            (1, 1, 3, 9),
        ] {
            for leaky in [false, true] {
                let what = format!("{c_in}→{c_out} over {h}×{w}, LeakyRelu {leaky}");
                let input = Tensor::from_shape(&[1, c_in, h, w], &values(c_in * h * w, 3)).unwrap();
                let tracts = one_conv(c_in, c_out, h, w, 1, leaky);
                let mut ours = tracts.clone();
                assert_eq!(direct_f32_convolutions(&mut ours).unwrap(), 1, "{what}");
                let names = ops(&ours);
                assert!(names.iter().any(|n| n == "DeskcamDirectConv3x3"), "{what}: {names:?}");
                assert!(!names.iter().any(|n| n == "Conv" || n.contains("LeakyRelu")), "{what}: {names:?}");
                close(&run(ours, &input), &run(tracts, &input), &what);
            }
        }
    }

    #[test]
    fn computes_what_tracts_strided_convolution_computes() {
        if !kernel_available() {
            eprintln!("no vector kernel on this machine: nothing to compare");
            return;
        }
        // The network's first layer (3→32) on a small image; odd sides (the last column's
        // right neighbour is padding); rows of a few vectors, a tile and a half, and
        // not a whole number of vectors; one output row; channels not a whole block.
        for (c_in, c_out, h, w) in
            [(3, 32, 16, 16), (3, 5, 9, 17), (2, 7, 7, 33), (1, 1, 1, 16), (4, 6, 10, 52), (5, 3, 3, 21)]
        {
            for leaky in [false, true] {
                let what = format!("{c_in}→{c_out} over {h}×{w} at stride 2, LeakyRelu {leaky}");
                let input = Tensor::from_shape(&[1, c_in, h, w], &values(c_in * h * w, 4)).unwrap();
                let tracts = strided_conv(c_in, c_out, h, w, 1, 2, leaky);
                let mut ours = tracts.clone();
                assert_eq!(direct_f32_convolutions(&mut ours).unwrap(), 1, "{what}");
                let names = ops(&ours);
                assert!(!names.iter().any(|n| n == "Conv" || n.contains("LeakyRelu")), "{what}: {names:?}");
                close(&run(ours, &input), &run(tracts, &input), &what);
            }
        }
    }

    #[test]
    fn leaves_what_it_does_not_cover_to_tract() {
        // No padding, rows narrower than a vector, and more output channels than it is
        // faster for.
        for (model, what) in [
            (one_conv(4, 4, 9, 16, 0, true), "unpadded"),
            (one_conv(4, 4, 9, 3, 1, true), "3 wide"),
            (one_conv(4, 64, 9, 16, 1, true), "64 channels"),
            (strided_conv(4, 4, 9, 16, 0, 2, true), "unpadded at stride 2"),
            (strided_conv(4, 4, 9, 16, 1, 3, true), "stride 3"),
            (strided_conv(4, 4, 9, 6, 1, 2, true), "3 wide at stride 2"),
        ] {
            let mut ours = model.clone();
            assert_eq!(direct_f32_convolutions(&mut ours).unwrap(), 0, "{what}");
            assert_eq!(ops(&ours), ops(&model), "{what}");
        }
    }

    /// The shipped float model: the 3×3 convolutions with few channels replaced, and its outputs
    /// those of tract's plan within the tolerance of a different order of sums.
    #[cfg(feature = "onnx")]
    #[test]
    fn the_float_model_computes_the_same_with_it() {
        if !kernel_available() {
            eprintln!("no vector kernel on this machine: nothing to compare");
            return;
        }
        let tracts = float_model();
        let mut ours = tracts.clone();
        let replaced = direct_f32_convolutions(&mut ours).unwrap();
        // The NanoDet of models/: 24 of its 34 convolutions are 3×3 at stride 1 and 4 at
        // stride 2 (the rest are 1×1), each followed by its LeakyRelu; 8 of the first and
        // 1 of the second (the first layer, 3→32) have at most 32 output channels (see
        // `worth_it`).
        assert_eq!(replaced, 9);
        assert_same_outputs(tracts, ours);
    }

    /// The shipped float model, decluttered (where our convolutions go in).
    #[cfg(feature = "onnx")]
    pub(crate) fn float_model() -> TypedModel {
        let bytes = std::fs::read(deskcam_testkit::repo().join("models/nanodet.onnx")).unwrap();
        crate::detector::onnx_typed(&bytes).unwrap().into_decluttered().unwrap()
    }

    /// `ours` computes what `tracts` computes on a 416×416 input, within the tolerance of
    /// another order of sums 20 layers deep: a relative 1e-3 of each output's range.
    #[cfg(feature = "onnx")]
    pub(crate) fn assert_same_outputs(tracts: TypedModel, ours: TypedModel) {
        let n = 416;
        let pixels: Vec<f32> = (0..3 * n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
        let input = Tensor::from_shape(&[1, 3, n, n], &pixels).unwrap();
        let a = run_all(tracts, &input);
        let b = run_all(ours, &input);
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in b.iter().zip(&a).enumerate() {
            close_within(x, y, 1e-3, &format!("output {i}"));
        }
    }
}
