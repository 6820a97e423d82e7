//! The NanoDet COCO detector on tract: letterbox and normalise, run, decode the
//! distribution-focal box regression, non-maximum suppression.
//!
//! The model is loaded, typed and optimised once in [`Detector::load`]; a frame only
//! runs the prepared plan.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deskcam_core::detection::PERSON;
use deskcam_core::{BBox, Detection, COCO_CLASSES};
use tract_nnef::prelude::*;

use crate::Frame;

/// Per-channel mean and standard deviation NanoDet was trained with, in the model's
/// B, G, R input channel order.
const MEAN_BGR: [f32; 3] = [103.53, 116.28, 123.675];
const STD_BGR: [f32; 3] = [57.375, 57.12, 58.395];
/// Bins of the box-side distribution per side (`reg_max + 1`).
const REG_BINS: usize = 11;
/// At most this many boxes of other classes than `person` leave NMS. People are never
/// capped: every person must reach the redaction of the still.
const MAX_OBJECTS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error("model {path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("model {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("inference failed: {0}")]
    Run(String),
}

/// How the letterboxed input maps back to frame pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Letterbox {
    pub scale: f32,
    pub pad_x: f32,
    pub pad_y: f32,
}

impl Letterbox {
    fn unmap(&self, b: BBox, w: u32, h: u32) -> BBox {
        let f = |v: f32, pad: f32, max: u32| ((v - pad) / self.scale).clamp(0.0, max as f32);
        BBox::new(
            f(b.x0, self.pad_x, w),
            f(b.y0, self.pad_y, h),
            f(b.x1, self.pad_x, w),
            f(b.y1, self.pad_y, h),
        )
    }
}

/// One output level of the head: `cells` grid cells at `stride` pixels, class scores
/// (`cells × 80`, already sigmoid) and box distributions (`cells × 44`).
pub struct HeadLevel<'a> {
    pub stride: usize,
    pub scores: &'a [f32],
    pub boxes: &'a [f32],
}

/// How many cores tract's matrix products use, for every model in the process
/// (tract keeps one executor). 1: the calling thread only.
/// Returns the number in use: 1 in a build without the `multithread` feature.
pub fn set_inference_threads(n: usize) -> usize {
    use tract_linalg::multithread::{set_default_executor, Executor};
    #[cfg(feature = "multithread")]
    {
        set_default_executor(if n > 1 { Executor::multithread(n) } else { Executor::SingleThread });
        n.max(1)
    }
    #[cfg(not(feature = "multithread"))]
    {
        let _ = n;
        set_default_executor(Executor::SingleThread);
        1
    }
}

/// Whether a model file is tract's NNEF archive (`*.nnef.tar`) rather than ONNX.
pub fn is_nnef(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".nnef.tar"))
}

/// An ONNX model with its input fixed to 1×3×N×N (N from the file), typed.
#[cfg(feature = "onnx")]
pub(crate) fn onnx_typed(bytes: &[u8]) -> TractResult<TypedModel> {
    use tract_onnx::prelude::{Framework as _, InferenceModelExt as _};
    let model = tract_onnx::onnx().model_for_read(&mut &*bytes)?;
    let shape = model
        .input_fact(0)?
        .shape
        .as_concrete_finite()?
        .map(|s| s.to_vec())
        .ok_or_else(|| tract_nnef::internal::format_err!("the input shape is not fixed"))?;
    model
        .with_input_fact(0, tract_onnx::prelude::InferenceFact::dt_shape(f32::datum_type(), shape))?
        .into_typed()
}

#[cfg(not(feature = "onnx"))]
pub(crate) fn onnx_typed(_bytes: &[u8]) -> TractResult<TypedModel> {
    tract_nnef::internal::bail!(
        "this build reads NNEF models only (`*.nnef.tar`, made by `deskcam model export-nnef`)"
    )
}

/// Writes an ONNX model as tract's NNEF archive, typed and decluttered: what the boards
/// load when their config says `model.form = "nnef"` (no ONNX front end in the binary).
#[cfg(feature = "onnx")]
pub fn export_nnef(onnx: &Path, out: &Path) -> Result<(), DetectorError> {
    let err = |e: TractError| DetectorError::Load { path: onnx.into(), reason: format!("{e:#}") };
    let bytes = std::fs::read(onnx).map_err(|source| DetectorError::Read { path: onnx.into(), source })?;
    let model = onnx_typed(&bytes).and_then(|m| m.into_decluttered()).map_err(err)?;
    // Written beside the target and renamed when complete: a model tract cannot write
    // (an op without an NNEF form) leaves no half archive where a device would load it.
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let io_err = |source| DetectorError::Read { path: out.into(), source };
    let file = std::fs::File::create(&partial).map_err(io_err)?;
    let written = nnef_framework().write_to_tar(&model, file).map_err(err);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, out).map_err(io_err)
}

/// A reader that hashes (SHA-256) what is read through it.
struct HashingReader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

impl<R> HashingReader<R> {
    fn hex(self) -> String {
        use sha2::Digest;
        crate::hex(&self.hash.finalize())
    }
}

/// tract's NNEF framework with what our models need: the ONNX ops' NNEF forms and ours
/// for the int8 model's quantisation ops.
fn nnef_framework() -> tract_nnef::framework::Nnef {
    use tract_onnx_opl::WithOnnx;
    tract_nnef::nnef().with_onnx().with_registry(crate::nnef_quant::registry())
}

pub struct Detector {
    plan: Arc<TypedRunnableModel>,
    /// What pre-processing reuses from frame to frame.
    buffers: std::sync::Mutex<Buffers>,
    input_size: usize,
    min_score: f32,
    nms_iou: f32,
    sha256: String,
    path: PathBuf,
}

impl Detector {
    /// Loads and optimises the model. `min_score` and `nms_iou` filter the output.
    pub fn load(path: &Path, min_score: f32, nms_iou: f32) -> Result<Self, DetectorError> {
        let read_err = |source| DetectorError::Read { path: path.into(), source };
        let load_err = |e: TractError| DetectorError::Load { path: path.into(), reason: format!("{e:#}") };
        // The model's file is as large as its weights: the NNEF archive is read as a
        // stream (hashed on the way), and an ONNX file's bytes are dropped before the
        // optimiser runs, so the file is never in memory beside the optimised model.
        let (model, sha256) = if is_nnef(path) {
            let file = std::fs::File::open(path).map_err(read_err)?;
            let mut reader = HashingReader { inner: std::io::BufReader::new(file), hash: Default::default() };
            let model = nnef_framework().model_for_read(&mut reader).map_err(load_err)?;
            // The archive's end (padding the reader stops before) is part of the file.
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(read_err)?;
            (model, reader.hex())
        } else {
            let bytes = std::fs::read(path).map_err(read_err)?;
            (onnx_typed(&bytes).map_err(load_err)?, crate::sha256_hex(&bytes))
        };
        let input_size = model
            .input_fact(0)
            .ok()
            .and_then(|f| f.shape.as_concrete().map(|s| s.to_vec()))
            .and_then(|s| (s.len() == 4 && s[1] == 3 && s[2] == s[3]).then_some(s[2]))
            .ok_or_else(|| DetectorError::Load {
                path: path.into(),
                reason: "input is not 1×3×N×N".into(),
            })?;
        let mut model = model.into_decluttered().map_err(load_err)?;
        // The float model's 3×3 convolutions with few channels computed directly
        // (direct_conv.rs: no gathered patches, no padded copy; the first layer at
        // stride 2 too). DESKCAM_TRACT_CONV=1
        // keeps tract's for all of them, to measure the difference (MODEL_CARD.md).
        if std::env::var_os("DESKCAM_TRACT_CONV").is_none() {
            crate::direct_conv::direct_f32_convolutions(&mut model).map_err(load_err)?;
            // Those with many channels by Winograd's minimal filtering (winograd.rs:
            // F(4×4, 3×3) over the large grids, 4 times fewer multiply-adds, F(2×2, 3×3)
            // over the others, 2.25 times; the products tract's). DESKCAM_NO_WINOGRAD=1
            // keeps tract's for them, to measure.
            if std::env::var_os("DESKCAM_NO_WINOGRAD").is_none() {
                crate::winograd::winograd_f32_convolutions(&mut model).map_err(load_err)?;
            }
        }
        // The resizes' and the max-pool's chains of small ops in one pass each (fused.rs:
        // the same values). DESKCAM_TRACT_CHAINS=1 keeps tract's nodes, to measure.
        let fuse = std::env::var_os("DESKCAM_TRACT_CHAINS").is_none();
        if fuse {
            crate::fused::fuse_chains(&mut model).map_err(load_err)?;
        }
        let mut optimized = model.into_optimized().map_err(load_err)?;
        // The Pads tract puts before its patches, with the Concats that feed them, as one
        // copy each (fused.rs).
        if fuse {
            crate::fused::padded_concats(&mut optimized).map_err(load_err)?;
        }
        // The float products' packing of their activations into a reused buffer
        // (packed_product.rs: the same products). DESKCAM_TRACT_PACKING=1 keeps tract's
        // packing nodes, to measure.
        if std::env::var_os("DESKCAM_TRACT_PACKING").is_none() {
            crate::packed_product::packed_products(&mut optimized).map_err(load_err)?;
            // The int8 products over explicit patches read the patches' rows where they
            // lie (no slices, no concatenation). DESKCAM_NO_TAPS=1 keeps those, to
            // measure.
            if std::env::var_os("DESKCAM_NO_TAPS").is_none() {
                crate::packed_product::tapped_products(&mut optimized).map_err(load_err)?;
            }
        }
        // The int8 model's activations packed by our packer (int8_pack.rs: the same bytes,
        // a fraction of the instructions). DESKCAM_TRACT_PACKER=1 keeps tract's own, to
        // measure the difference (MODEL_CARD.md).
        if std::env::var_os("DESKCAM_TRACT_PACKER").is_none() {
            crate::int8_pack::faster_int8_packing(&mut optimized).map_err(load_err)?;
        }
        let plan = optimized.into_runnable().map_err(load_err)?;
        let pool = crate::reuse::Pool::for_plan(&plan, pool_budget()).map_err(load_err)?;
        let kept = pool.kept();
        tracing::debug!(
            "detector: {} outputs of {} sizes pooled, {} KiB",
            kept.iter().map(|c| c.nodes).sum::<usize>(),
            kept.len(),
            kept.iter().map(crate::reuse::Class::bytes).sum::<usize>() >> 10
        );
        let buffers = Buffers { input: None, xtaps: vec![], state: None, pool };
        Ok(Detector {
            plan,
            buffers: std::sync::Mutex::new(buffers),
            input_size,
            min_score,
            nms_iou,
            sha256,
            path: path.into(),
        })
    }

    /// Changes the output filter of a loaded model (a config change, applied live).
    pub fn set_thresholds(&mut self, min_score: f32, nms_iou: f32) {
        self.min_score = min_score;
        self.nms_iou = nms_iou;
    }

    pub fn input_size(&self) -> usize {
        self.input_size
    }

    /// Hex sha256 of the model file, reported in `state` so a fleet knows what runs.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Detects objects in a frame; boxes are in frame pixels.
    pub fn detect(&self, frame: &Frame) -> Result<Vec<Detection>, DetectorError> {
        self.detections(&self.run_head(frame)?)
    }

    /// Runs the network on a frame and returns its raw head outputs.
    pub fn run_head(&self, frame: &Frame) -> Result<HeadOutputs, DetectorError> {
        let n = self.input_size;
        let mut buffers = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        let Buffers { input: slot, xtaps, state, pool } = &mut *buffers;
        let mut input = match slot.take() {
            Some(t) if Arc::strong_count(&t) == 1 && Arc::weak_count(&t) == 0 => t,
            // The first frame, or the last input is still shared: a fresh tensor.
            _ => Tensor::zero::<f32>(&[1, 3, n, n])
                .map(Arc::new)
                .map_err(|e| DetectorError::Run(format!("{e:#}")))?,
        };
        let not_writable = || DetectorError::Run("the input tensor is not writable in place".into());
        let tensor = Arc::get_mut(&mut input).ok_or_else(not_writable)?;
        let mut view =
            tensor.to_plain_array_view_mut::<f32>().map_err(|e| DetectorError::Run(format!("{e:#}")))?;
        let data = view.as_slice_mut().ok_or_else(not_writable)?;
        let letterbox = preprocess_into(frame.image(), n, data, xtaps);
        let state = match state {
            Some(s) => s,
            None => state.insert(self.plan.spawn().map_err(|e| DetectorError::Run(format!("{e:#}")))?),
        };
        let outputs = pool.run(state, tvec!(TValue::from_const(input.clone())));
        *slot = Some(input);
        let outputs = match outputs {
            Ok(o) => o,
            Err(e) => {
                // A failed run may leave its values in the state: start afresh next time.
                buffers.state = None;
                return Err(DetectorError::Run(format!("{e:#}")));
            }
        };
        Ok(HeadOutputs {
            outputs,
            letterbox,
            width: frame.width(),
            height: frame.height(),
            input_size: self.input_size,
        })
    }

    /// Runs the network `warmup` times untimed, then `runs` times on a frame, and returns
    /// the time of each node of the optimised plan (its fastest of the timed runs: a run
    /// where the thread was preempted in the middle of a node does not count against
    /// that node), for `deskcam bench --profile`. Not the hot path: a state of its own
    /// (the warm-up prepares the same one), a clock read per node. `allocations` reads
    /// the process's count of heap allocations (the daemon's allocator keeps it): each
    /// node's of the last run are its [`NodeTime::allocations`].
    pub fn profile(
        &self,
        frame: &Frame,
        warmup: usize,
        runs: usize,
        allocations: &dyn Fn() -> u64,
    ) -> Result<Vec<NodeTime>, DetectorError> {
        let err = |e: TractError| DetectorError::Run(format!("{e:#}"));
        let input = preprocess(frame.image(), self.input_size).0.into_tvalue();
        let model = self.plan.model();
        let mut times: Vec<NodeTime> = model
            .nodes()
            .iter()
            .map(|node| NodeTime {
                name: node.name.clone(),
                op: node.op.name().to_string(),
                info: node.op.info().map(|i| i.join("; ")).unwrap_or_default(),
                seconds: f64::INFINITY,
                allocations: 0,
            })
            .collect();
        let mut state = self.plan.spawn().map_err(err)?;
        let mut pool = crate::reuse::Pool::for_plan(&self.plan, pool_budget()).map_err(err)?;
        for _ in 0..warmup {
            pool.run(&mut state, tvec!(input.clone())).map_err(err)?;
        }
        for _ in 0..runs {
            state
                .run_plan_with_eval(tvec!(input.clone()), |ctx, op_state, node, inputs| {
                    let a = allocations();
                    let t = std::time::Instant::now();
                    let out = pool.eval(ctx, op_state, node, inputs);
                    let seconds = t.elapsed().as_secs_f64();
                    let node_time = &mut times[node.id];
                    node_time.seconds = node_time.seconds.min(seconds);
                    node_time.allocations = allocations() - a;
                    out
                })
                .map_err(err)?;
        }
        // Nodes the plan never evaluates (constants folded into their consumers) took
        // no time.
        for t in times.iter_mut().filter(|t| t.seconds.is_infinite()) {
            t.seconds = 0.0;
        }
        Ok(times)
    }

    /// Decodes head outputs into boxes in frame pixels, after NMS.
    pub fn detections(&self, head: &HeadOutputs) -> Result<Vec<Detection>, DetectorError> {
        let levels = head.levels()?;
        let mut dets = nms(decode(&levels, self.min_score), self.nms_iou);
        for d in &mut dets {
            d.bbox = head.letterbox.unmap(d.bbox, head.width, head.height);
        }
        dets.retain(|d| d.bbox.area() > 0.0);
        Ok(dets)
    }
}

/// The time one node of the optimised plan took (`Detector::profile`).
#[derive(Debug, Clone)]
pub struct NodeTime {
    pub name: String,
    /// The op's name, e.g. `Conv` or `OptMatMul`.
    pub op: String,
    /// The op's own description (shapes, kernels), as tract's `dump` shows it.
    pub info: String,
    pub seconds: f64,
    /// Heap allocations in the node's evaluation (the last profiled run).
    pub allocations: u64,
}

/// The raw outputs of one run of the network.
pub struct HeadOutputs {
    outputs: TVec<TValue>,
    letterbox: Letterbox,
    width: u32,
    height: u32,
    input_size: usize,
}

impl HeadOutputs {
    /// The outputs paired per level (strides 8, 16, 32).
    pub fn levels(&self) -> Result<Vec<HeadLevel<'_>>, DetectorError> {
        let views: Vec<(Vec<usize>, &[f32])> = self
            .outputs
            .iter()
            .map(|t| {
                let view = t.to_plain_array_view::<f32>()?;
                let slice = view.to_slice().ok_or_else(|| TractError::msg("output is not contiguous"))?;
                Ok((t.shape().to_vec(), slice))
            })
            .collect::<TractResult<_>>()
            .map_err(|e| DetectorError::Run(format!("{e:#}")))?;
        pair_levels(&views, self.input_size).map_err(DetectorError::Run)
    }
}

/// Resizes keeping the aspect ratio into a `size`×`size` square (centred; the padding
/// is the training mean, so it normalises to 0) and normalises into an NCHW BGR tensor.
///
/// The resize is plain bilinear with half-pixel centres, written out here (and in
/// `models/make_reference.py`) so the reference outputs of onnxruntime can be
/// reproduced to float precision.
pub fn preprocess(img: &image::RgbImage, size: usize) -> (Tensor, Letterbox) {
    let mut data = vec![0f32; 3 * size * size];
    let letterbox = preprocess_into(img, size, &mut data, &mut Vec::new());
    (Tensor::from_shape(&[1, 3, size, size], &data).expect("shape matches data length"), letterbox)
}

/// The bytes of the plan's outputs kept from frame to frame (reuse.rs), by default
/// [`POOL_BUDGET_MB`]; `DESKCAM_POOL_MB` sets another, to measure.
fn pool_budget() -> usize {
    let mb = std::env::var("DESKCAM_POOL_MB").ok().and_then(|v| v.parse::<usize>().ok());
    mb.unwrap_or(POOL_BUDGET_MB) << 20
}

/// The default of [`pool_budget`]. Pooling every size of the fp32 model's outputs kept
/// 21.7 MiB (the board's peak RSS went from 56.4 to 77.3 MB, target 64); 4 MiB keeps the
/// small, frequent sizes and leaves the first layers' few large tensors to the allocator
/// (allocations per inference by budget: README, "Speed").
pub const POOL_BUDGET_MB: usize = 4;

/// The input tensor and the resize's column taps, reused from frame to frame: tract holds
/// the tensor only during a run, so no 2 MB buffer is allocated per frame.
struct Buffers {
    input: Option<Arc<Tensor>>,
    xtaps: Vec<Tap>,
    /// One run state for every frame: `plan.run` would build a new one each time (its
    /// per-node op states, value slots and matrix-product scratch space).
    state: Option<TypedSimpleState>,
    /// The nodes' outputs that are ours to allocate (reuse.rs).
    pool: crate::reuse::Pool,
}

/// Bilinear taps of one output column or row: the two source indices and the weight of
/// the second.
pub type Tap = (usize, usize, f32);

/// [`preprocess`] into `data` (`3 × size × size`, NCHW), overwriting all of it: the
/// detector's reused input tensor. `xtaps` is scratch space for the column taps.
pub fn preprocess_into(
    img: &image::RgbImage,
    size: usize,
    data: &mut [f32],
    xtaps: &mut Vec<Tap>,
) -> Letterbox {
    let (w, h) = (img.width().max(1) as usize, img.height().max(1) as usize);
    let scale = (size as f32 / w as f32).min(size as f32 / h as f32);
    let nw = ((w as f32 * scale).round() as usize).clamp(1, size);
    let nh = ((h as f32 * scale).round() as usize).clamp(1, size);
    let pad_x = (size - nw) / 2;
    let pad_y = (size - nh) / 2;
    let plane = size * size;
    // The padding normalises to 0 (it is the training mean).
    data.fill(0.0);
    let src = img.as_raw();
    let taps = |out: usize, n_out: usize, n_in: usize| -> Tap {
        let s = ((out as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5).clamp(0.0, (n_in - 1) as f32);
        let i0 = s.floor() as usize;
        (i0, (i0 + 1).min(n_in - 1), s - i0 as f32)
    };
    xtaps.clear();
    xtaps.extend((0..nw).map(|x| taps(x, nw, w)));
    for oy in 0..nh {
        let (y0, y1, fy) = taps(oy, nh, h);
        for (ox, &(x0, x1, fx)) in xtaps.iter().enumerate() {
            let px = |x: usize, y: usize, c: usize| src[(y * w + x) * 3 + c] as f32;
            let idx = (oy + pad_y) * size + ox + pad_x;
            // Model channel c takes B, G, R for c = 0, 1, 2.
            for c in 0..3 {
                let rgb = 2 - c;
                let top = px(x0, y0, rgb) * (1.0 - fx) + px(x1, y0, rgb) * fx;
                let bottom = px(x0, y1, rgb) * (1.0 - fx) + px(x1, y1, rgb) * fx;
                let v = top * (1.0 - fy) + bottom * fy;
                data[c * plane + idx] = (v - MEAN_BGR[c]) / STD_BGR[c];
            }
        }
    }
    Letterbox { scale, pad_x: pad_x as f32, pad_y: pad_y as f32 }
}

/// Pairs the six outputs into levels by their shapes: `[1, n, 80]` scores and
/// `[1, n, 44]` boxes for n = (size/stride)² — robust to the output order of a conversion.
pub fn pair_levels<'a>(
    outputs: &[(Vec<usize>, &'a [f32])],
    input_size: usize,
) -> Result<Vec<HeadLevel<'a>>, String> {
    let mut levels = Vec::new();
    for stride in [8usize, 16, 32] {
        let cells = (input_size / stride).pow(2);
        let find = |ch: usize| {
            outputs
                .iter()
                .find(|(s, _)| s.len() == 3 && s[1] == cells && s[2] == ch)
                .map(|(_, d)| *d)
                .ok_or_else(|| format!("model has no output of shape [1, {cells}, {ch}] (stride {stride})"))
        };
        levels.push(HeadLevel { stride, scores: find(COCO_CLASSES.len())?, boxes: find(4 * REG_BINS)? });
    }
    Ok(levels)
}

/// Turns head outputs into boxes in input-image pixels, every class above `min_score`.
///
/// Each cell predicts, per side (left, top, right, bottom), a distribution over
/// `REG_BINS` distances; the distance is its expectation times the stride, measured
/// from the cell centre.
pub fn decode(levels: &[HeadLevel<'_>], min_score: f32) -> Vec<Detection> {
    let nc = COCO_CLASSES.len();
    let mut out = Vec::new();
    for lv in levels {
        let cells = lv.scores.len() / nc;
        let side = (cells as f64).sqrt() as usize;
        for i in 0..cells {
            let scores = &lv.scores[i * nc..(i + 1) * nc];
            if !scores.iter().any(|s| *s >= min_score) {
                continue;
            }
            let cx = ((i % side) as f32 + 0.5) * lv.stride as f32;
            let cy = ((i / side) as f32 + 0.5) * lv.stride as f32;
            let reg = &lv.boxes[i * 4 * REG_BINS..(i + 1) * 4 * REG_BINS];
            let d: Vec<f32> =
                reg.chunks_exact(REG_BINS).map(|bins| expectation(bins) * lv.stride as f32).collect();
            let bbox = BBox::new(cx - d[0], cy - d[1], cx + d[2], cy + d[3]);
            for (class_id, &score) in scores.iter().enumerate() {
                if score >= min_score {
                    out.push(Detection { class_id, score, bbox });
                }
            }
        }
    }
    out
}

/// Softmax over the bins, then the expected bin index.
fn expectation(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut sum, mut acc) = (0f32, 0f32);
    for (k, l) in logits.iter().enumerate() {
        let e = (l - max).exp();
        sum += e;
        acc += e * k as f32;
    }
    acc / sum
}

/// Greedy per-class non-maximum suppression: highest score first, dropping boxes of
/// the same class that overlap a kept one by more than `iou`. Output sorted by score.
pub fn nms(mut dets: Vec<Detection>, iou: f32) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.class_id.cmp(&b.class_id)));
    let mut kept: Vec<Detection> = Vec::new();
    let mut objects = 0;
    for d in dets {
        let person = d.class_id == PERSON;
        if !person && objects >= MAX_OBJECTS {
            continue;
        }
        if kept.iter().all(|k| k.class_id != d.class_id || k.bbox.iou(&d.bbox) <= iou) {
            objects += usize::from(!person);
            kept.push(d);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use deskcam_core::detection::CELL_PHONE;

    fn det(class_id: usize, score: f32, x0: f32) -> Detection {
        Detection { class_id, score, bbox: BBox::new(x0, 0.0, x0 + 10.0, 10.0) }
    }

    #[test]
    fn nms_keeps_best_of_overlapping_same_class_only() {
        let out = nms(
            vec![
                det(PERSON, 0.6, 1.0),
                det(PERSON, 0.9, 0.0),
                det(CELL_PHONE, 0.5, 0.0),
                det(PERSON, 0.4, 50.0),
            ],
            0.5,
        );
        let got: Vec<(usize, f32)> = out.iter().map(|d| (d.class_id, d.score)).collect();
        assert_eq!(got, vec![(PERSON, 0.9), (CELL_PHONE, 0.5), (PERSON, 0.4)]);
    }

    #[test]
    fn nms_never_caps_people() {
        let mut many: Vec<Detection> = (0..150).map(|i| det(CELL_PHONE, 0.9, i as f32 * 20.0)).collect();
        many.push(det(PERSON, 0.3, 0.0));
        let out = nms(many, 0.5);
        assert_eq!(out.iter().filter(|d| d.class_id == CELL_PHONE).count(), MAX_OBJECTS);
        assert_eq!(out.iter().filter(|d| d.class_id == PERSON).count(), 1);
    }

    #[test]
    fn decode_places_boxes_around_cell_centres() {
        // One 2×2 level at stride 8: cell 3 (x=1, y=1) is a person; distances peak at
        // bin 2 on every side, so the box is centre ± 2 * stride.
        let nc = COCO_CLASSES.len();
        let mut scores = vec![0f32; 4 * nc];
        scores[3 * nc + PERSON] = 0.8;
        let mut boxes = vec![-20f32; 4 * 4 * REG_BINS];
        for side in 0..4 {
            boxes[3 * 4 * REG_BINS + side * REG_BINS + 2] = 20.0;
        }
        let out = decode(&[HeadLevel { stride: 8, scores: &scores, boxes: &boxes }], 0.3);
        assert_eq!(out.len(), 1);
        let b = out[0].bbox;
        assert_eq!((out[0].class_id, out[0].score), (PERSON, 0.8));
        for (got, want) in [(b.x0, 12.0 - 16.0), (b.y0, -4.0), (b.x1, 28.0), (b.y1, 28.0)] {
            assert!((got - want).abs() < 1e-3, "{b:?}");
        }
    }

    #[test]
    fn expectation_of_uniform_bins_is_the_middle() {
        assert!((expectation(&[0.0; REG_BINS]) - 5.0).abs() < 1e-5);
    }

    #[test]
    fn letterbox_maps_back_to_frame_pixels() {
        let img = image::RgbImage::new(640, 320);
        let (t, lb) = preprocess(&img, 416);
        assert_eq!(t.shape(), &[1, 3, 416, 416]);
        assert!((lb.scale - 0.65).abs() < 1e-6);
        assert_eq!((lb.pad_x, lb.pad_y), (0.0, 104.0));
        let b = lb.unmap(BBox::new(0.0, 104.0, 416.0, 312.0), 640, 320);
        assert!((b.x1 - 640.0).abs() < 0.01 && b.y0.abs() < 0.01 && (b.y1 - 320.0).abs() < 0.01, "{b:?}");
        // Padding normalises to zero; black pixels to -mean/std.
        let view = t.to_plain_array_view::<f32>().unwrap();
        let data = view.as_slice().unwrap();
        assert_eq!(data[0], 0.0);
        assert!((data[200 * 416 + 10] - (-MEAN_BGR[0] / STD_BGR[0])).abs() < 1e-5);
    }
}
