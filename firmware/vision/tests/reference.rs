//! The Rust detector (pre-processing, tract, decoding, NMS) against onnxruntime's
//! results for the same model and photos (models/reference/, made by
//! models/make_reference.py). Needs the demo photos: scripts/fetch-demo-photos.

use deskcam_core::BBox;
use deskcam_testkit::{demo_photos, repo};
use deskcam_vision::detector::{decode, nms, HeadLevel};
use deskcam_vision::sha256_hex;
use deskcam_vision::source::{DirSource, FrameSource};
use deskcam_vision::Detector;
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(repo().join("models/reference/nanodet_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn bbox(v: &Value) -> BBox {
    let b = f32s(v);
    BBox::new(b[0], b[1], b[2], b[3])
}

#[test]
fn reference_belongs_to_the_committed_model() {
    let model = std::fs::read(repo().join("models/nanodet.onnx")).unwrap();
    let sha = sha256_hex(&model);
    assert_eq!(reference()["model_sha256"].as_str().unwrap(), sha, "re-run models/make_reference.py");
    let pinned = std::fs::read_to_string(repo().join("models/nanodet.onnx.sha256")).unwrap();
    assert!(pinned.starts_with(&sha), "models/nanodet.onnx does not match its pinned checksum");
}

#[test]
fn tract_matches_onnxruntime_on_demo_photos() {
    let r = reference();
    let min_score = r["min_score"].as_f64().unwrap() as f32;
    let det =
        Detector::load(&repo().join("models/nanodet.onnx"), min_score, r["nms_iou"].as_f64().unwrap() as f32)
            .unwrap();
    let dir = demo_photos();
    let token = deskcam_hw::sim::simulated_open();
    for photo in r["photos"].as_array().unwrap() {
        let name = photo["file"].as_str().unwrap();
        let path = dir.join(name);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-demo-photos", path.display()));
        let sha = sha256_hex(&bytes);
        assert_eq!(sha, photo["sha256"].as_str().unwrap(), "{name} differs from the reference photo");

        // One-photo directory, so the frame is read exactly as the daemon reads it.
        let one = std::env::temp_dir().join(format!("deskcam-ref-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&one).unwrap();
        std::fs::copy(&path, one.join(name)).unwrap();
        let frame = DirSource::open(&one, false).unwrap().next_frame(&token).unwrap();

        let head = det.run_head(&frame).unwrap();
        let levels = head.levels().unwrap();
        for cell in photo["cells"].as_array().unwrap() {
            let stride = cell["stride"].as_u64().unwrap() as usize;
            let i = cell["cell"].as_u64().unwrap() as usize;
            let lv = levels.iter().find(|l| l.stride == stride).unwrap();
            for (got, want) in lv.scores[i * 80..(i + 1) * 80].iter().zip(f32s(&cell["scores"])) {
                assert!((got - want).abs() < 2e-3, "{name} s{stride} cell {i}: score {got} vs {want}");
            }
            for (got, want) in lv.boxes[i * 44..(i + 1) * 44].iter().zip(f32s(&cell["boxes"])) {
                assert!((got - want).abs() < 2e-2, "{name} s{stride} cell {i}: box logit {got} vs {want}");
            }
        }

        let got = det.detections(&head).unwrap();
        let want = photo["detections"].as_array().unwrap();
        assert_eq!(got.len(), want.len(), "{name}: {got:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.class_id as u64, w["class_id"].as_u64().unwrap(), "{name}");
            assert!((g.score - w["score"].as_f64().unwrap() as f32).abs() < 2e-3, "{name}");
            assert!(g.bbox.iou(&bbox(&w["bbox"])) > 0.99, "{name}: {:?} vs {}", g.bbox, w["bbox"]);
        }
        let _ = std::fs::remove_dir_all(&one);
    }
}

/// Decoding and NMS alone, on the reference's stored cells (all other cells silent).
/// The reference stores every cell a kept detection came from; removing other cells
/// can only remove boxes that would have been suppressed or are weaker, so each
/// reference detection must be decoded again, with the same box in input pixels.
#[test]
fn decode_and_nms_recover_reference_detections_from_stored_cells() {
    let r = reference();
    let min_score = r["min_score"].as_f64().unwrap() as f32;
    for photo in r["photos"].as_array().unwrap() {
        let mut levels: Vec<(usize, Vec<f32>, Vec<f32>)> = [8usize, 16, 32]
            .iter()
            .map(|s| (*s, vec![0f32; (416 / s).pow(2) * 80], vec![0f32; (416 / s).pow(2) * 44]))
            .collect();
        for cell in photo["cells"].as_array().unwrap() {
            let stride = cell["stride"].as_u64().unwrap() as usize;
            let i = cell["cell"].as_u64().unwrap() as usize;
            let lv = levels.iter_mut().find(|l| l.0 == stride).unwrap();
            lv.1[i * 80..(i + 1) * 80].copy_from_slice(&f32s(&cell["scores"]));
            lv.2[i * 44..(i + 1) * 44].copy_from_slice(&f32s(&cell["boxes"]));
        }
        let heads: Vec<HeadLevel<'_>> =
            levels.iter().map(|(s, sc, bx)| HeadLevel { stride: *s, scores: sc, boxes: bx }).collect();
        let got = nms(decode(&heads, min_score), r["nms_iou"].as_f64().unwrap() as f32);
        for w in photo["detections"].as_array().unwrap() {
            let (class, score) =
                (w["class_id"].as_u64().unwrap() as usize, w["score"].as_f64().unwrap() as f32);
            let want_box = bbox(&w["input_bbox"]);
            assert!(
                got.iter().any(|g| g.class_id == class
                    && (g.score - score).abs() < 1e-4
                    && g.bbox.iou(&want_box) > 0.999),
                "{}: class {class} score {score} not decoded from the stored cells: {got:?}",
                photo["file"]
            );
        }
    }
}

/// The int8 (QDQ) model, pinned by its checksum, finds what the float model finds on
/// the demo photos: the same objects (class, IoU ≥ 0.8), scores within 0.1.
#[test]
fn int8_model_is_pinned_and_agrees_with_the_float_model() {
    int8_agrees_with_the_float_model("nanodet-int8.onnx");
}

/// The same for the int8 model the boards with a dot product ship (QLinearConv form).
#[test]
fn shipped_int8_model_is_pinned_and_agrees_with_the_float_model() {
    int8_agrees_with_the_float_model("nanodet-int8-qlinear.onnx");
}

fn int8_agrees_with_the_float_model(file: &str) {
    let int8 = repo().join("models").join(file);
    let sha = sha256_hex(&std::fs::read(&int8).unwrap());
    let pinned = std::fs::read_to_string(repo().join(format!("models/{file}.sha256"))).unwrap();
    assert!(pinned.starts_with(&sha), "models/{file} does not match its pinned checksum");
    let f32_det = Detector::load(&repo().join("models/nanodet.onnx"), 0.35, 0.5).unwrap();
    let i8_det = Detector::load(&int8, 0.25, 0.5).unwrap();
    let token = deskcam_hw::sim::simulated_open();
    let mut source = DirSource::open(&demo_photos(), false).unwrap();
    let mut compared = 0;
    while let Ok(frame) = source.next_frame(&token) {
        let want = f32_det.detect(&frame).unwrap();
        let got = i8_det.detect(&frame).unwrap();
        for w in &want {
            let best = got
                .iter()
                .filter(|g| g.class_id == w.class_id)
                .max_by(|a, b| a.bbox.iou(&w.bbox).total_cmp(&b.bbox.iou(&w.bbox)));
            let g =
                best.unwrap_or_else(|| panic!("{}: int8 misses {} {}", frame.origin(), w.label(), w.score));
            assert!(g.bbox.iou(&w.bbox) >= 0.8, "{}: {} box moved", frame.origin(), w.label());
            assert!(
                (g.score - w.score).abs() < 0.1,
                "{}: {} {} vs {}",
                frame.origin(),
                w.label(),
                g.score,
                w.score
            );
            compared += 1;
        }
    }
    assert!(compared >= 5, "too few detections compared: {compared}");
}

/// A model tract cannot write as NNEF (the QDQ model: no NNEF form for its quantise
/// ops) is refused with no archive left behind, whole or partial.
#[test]
fn a_model_without_an_nnef_form_leaves_no_archive() {
    let int8 = repo().join("models/nanodet-int8.onnx");
    let out = std::env::temp_dir().join(format!("deskcam-test-int8-{}.nnef.tar", std::process::id()));
    let e = deskcam_vision::detector::export_nnef(&int8, &out).unwrap_err();
    assert!(e.to_string().contains("No serializer found"), "{e}");
    assert!(!out.exists());
    assert!(!out.with_extension("tar.partial").exists());
}

/// The NNEF form the boards load (`deskcam model export-nnef`) computes what the ONNX
/// model computes: the same raw head outputs on the demo photos.
#[test]
fn nnef_export_matches_the_onnx_model() {
    nnef_export_matches("nanodet.onnx");
}

/// The same for the shipped int8 model, whose quantise, dequantise and lookup-table ops
/// are written in NNEF by forms of our own (nnef_quant).
#[test]
fn int8_nnef_export_matches_the_onnx_model() {
    nnef_export_matches("nanodet-int8-qlinear.onnx");
}

fn nnef_export_matches(file: &str) {
    let onnx = repo().join("models").join(file);
    let nnef = std::env::temp_dir().join(format!("deskcam-test-{}-{file}.nnef.tar", std::process::id()));
    deskcam_vision::detector::export_nnef(&onnx, &nnef).unwrap();
    let a = Detector::load(&onnx, 0.3, 0.5).unwrap();
    let b = Detector::load(&nnef, 0.3, 0.5).unwrap();
    assert_eq!(a.input_size(), b.input_size());
    // The archive is hashed as it is read: the whole file, as the pin and the status say.
    assert_eq!(b.sha256(), sha256_hex(&std::fs::read(&nnef).unwrap()));
    assert_eq!(a.sha256(), sha256_hex(&std::fs::read(&onnx).unwrap()));
    let token = deskcam_hw::sim::simulated_open();
    let mut source = DirSource::open(&demo_photos(), false).unwrap();
    let mut frames = 0;
    while let Ok(frame) = source.next_frame(&token) {
        let (ha, hb) = (a.run_head(&frame).unwrap(), b.run_head(&frame).unwrap());
        for (la, lb) in ha.levels().unwrap().iter().zip(hb.levels().unwrap().iter()) {
            let worst = la.scores.iter().zip(lb.scores).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{}: scores differ by {worst}", frame.origin());
        }
        assert_eq!(a.detections(&ha).unwrap(), b.detections(&hb).unwrap());
        frames += 1;
    }
    assert!(frames >= 4);
    let _ = std::fs::remove_file(&nnef);
}
