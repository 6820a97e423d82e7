//! Redaction on real photos (`../shared/data/frames`, COCO, with person boxes): with
//! the labelled people as detections, no 4×4 patch of a person with any detail in it
//! survives as it was,
//! and nothing outside the desk region survives at all. Checked on the image the still
//! is encoded from, pixel by pixel.

use deskcam_core::config::{Config, Region};
use deskcam_core::detection::PERSON;
use deskcam_core::{BBox, Detection};
use deskcam_vision::render_redacted;
use deskcam_vision::source::{DirSource, FrameSource};
use serde_json::Value;

#[test]
fn no_person_patch_and_nothing_outside_the_region_survives() {
    let Some(dir) = deskcam_testkit::shared_frames() else {
        println!("skipped: no ../shared/data/frames");
        return;
    };
    let labels: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("labels.json")).unwrap()).unwrap();
    let mut cfg = Config::default().evidence;
    // A desk: a trapezoid over the lower part of the frame.
    cfg.region = Region(vec![(0.1, 0.35), (0.9, 0.35), (1.0, 1.0), (0.0, 1.0)]);
    let token = deskcam_hw::sim::simulated_open();
    let one = std::env::temp_dir().join(format!("deskcam-redaction-{}", std::process::id()));
    let (mut photos, mut patches, mut outside) = (0, 0u64, 0u64);
    for l in &labels {
        let people: Vec<Detection> = l["objects"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["class"] == "person")
            .map(|o| {
                let b: Vec<f32> =
                    o["bbox_xywh"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
                Detection { class_id: PERSON, score: 1.0, bbox: BBox::from_xywh(b[0], b[1], b[2], b[3]) }
            })
            .collect();
        if people.is_empty() {
            continue;
        }
        let file = l["file"].as_str().unwrap();
        let _ = std::fs::remove_dir_all(&one);
        std::fs::create_dir_all(&one).unwrap();
        std::fs::copy(dir.join(file), one.join(file)).unwrap();
        let frame = DirSource::open(&one, false).unwrap().next_frame(&token).unwrap();
        let original = image::open(dir.join(file)).unwrap().to_rgb8();
        let (img, _) = render_redacted(&frame, &people, &[], &cfg).unwrap();
        let (w, h) = (img.width(), img.height());
        photos += 1;

        for (x, y, p) in img.enumerate_pixels() {
            if !cfg.region.contains((x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32) {
                assert_eq!(p.0, [0, 0, 0], "{file}: pixel ({x}, {y}) outside the region survives");
                outside += 1;
            }
        }
        for d in &people {
            let b = d.bbox;
            let (x0, y0) = (b.x0.ceil() as u32, b.y0.ceil() as u32);
            let (x1, y1) = ((b.x1.floor() as u32).min(w), (b.y1.floor() as u32).min(h));
            for wy in (y0..y1.saturating_sub(3)).step_by(2) {
                for wx in (x0..x1.saturating_sub(3)).step_by(2) {
                    let px = |im: &image::RgbImage, i: u32| im.get_pixel(wx + i % 4, wy + i / 4).0;
                    // A patch whose channels vary by at most 4 levels shows nothing (this
                    // happens in near-black shadows, where cell means can equal it).
                    let flat = (0..3).all(|c| {
                        let v: Vec<u8> = (0..16).map(|i| px(&original, i)[c]).collect();
                        v.iter().max().unwrap() - v.iter().min().unwrap() <= 4
                    });
                    let same = (0..16).all(|i| px(&img, i) == px(&original, i));
                    assert!(
                        flat || !same,
                        "{file}: a 4x4 patch of a person at ({wx}, {wy}) survives unblurred: {:?} {:?}",
                        (0..16).map(|i| px(&original, i)).collect::<Vec<_>>(),
                        b
                    );
                    patches += 1;
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&one);
    println!("{photos} photos with people: {patches} person patches and {outside} pixels outside the region checked");
    assert!(photos >= 50 && patches > 100_000);
}
