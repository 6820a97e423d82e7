//! Heap allocations of the detector per frame in steady state (issue 4: no per-frame
//! allocation of tensors). The detector reuses its input tensor, its run state and a
//! pool of the plan's outputs (reuse.rs); what is left are the outputs the pool's budget
//! leaves to the allocator and tract's ops that allocate their own. Counted with the
//! daemon's counting allocator; the figures are printed (`--nocapture`) and bounded, so
//! a change that brings back per-node allocation fails here. Needs the demo photos
//! (scripts/fetch-demo-photos).

use deskcam_core::alloc_count::{self, Counting};
use deskcam_testkit::{demo_photos, repo};
use deskcam_vision::source::{DirSource, FrameSource};
use deskcam_vision::Detector;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn the_detector_allocates_little_and_the_same_on_every_frame() {
    let photos = demo_photos();
    let token = deskcam_hw::sim::simulated_open();
    let frame = DirSource::open(&photos, false).unwrap().next_frame(&token).unwrap();
    // Bounds above today's figures on x86 (fp32 149 with the 4 MiB pool budget, 1,604
    // before the pool; int8 1,087 on a CPU with VNNI, whose products with tract's
    // dot-product kernels are fused with their packing, 2,432 before; elsewhere tract
    // packs them itself, and some of the int8 model's ops are not pooled yet).
    for (model, bound) in [("nanodet.onnx", 200), ("nanodet-int8-qlinear.onnx", 3000)] {
        let det = Detector::load(&repo().join("models").join(model), 0.35, 0.6).unwrap();
        for _ in 0..2 {
            det.run_head(&frame).unwrap();
        }
        let counts: Vec<(u64, u64)> = (0..3)
            .map(|_| {
                let (a0, b0) = alloc_count::count();
                let head = det.run_head(&frame).unwrap();
                let (a1, b1) = alloc_count::count();
                drop(head);
                (a1 - a0, b1 - b0)
            })
            .collect();
        eprintln!("{model}: allocations (count, bytes) per inference, steady state: {counts:?}");
        assert!(counts.iter().all(|c| *c == counts[0]), "{model}: not steady: {counts:?}");
        assert!(counts[0].0 <= bound, "{model}: {} allocations per inference (bound {bound})", counts[0].0);
    }
}
