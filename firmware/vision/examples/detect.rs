//! Prints the detector's boxes for photos: `cargo run --example detect -- MODEL PHOTO...`
use deskcam_vision::source::{DirSource, FrameSource};
use deskcam_vision::Detector;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, dir) = match args.as_slice() {
        [m, d] => (m, d),
        _ => return Err("usage: detect MODEL.onnx PHOTO_DIR".into()),
    };
    let t0 = std::time::Instant::now();
    let det = Detector::load(model.as_ref(), 0.3, 0.5)?;
    println!("loaded in {:?}", t0.elapsed());
    let mut src = DirSource::open(dir.as_ref(), false)?;
    let token = deskcam_hw::sim::simulated_open();
    loop {
        let frame = match src.next_frame(&token) {
            Ok(f) => f,
            Err(e) if e.is_skippable() => continue,
            Err(_) => break,
        };
        let t = std::time::Instant::now();
        let dets = det.detect(&frame)?;
        let list: Vec<String> = dets.iter().map(|d| format!("{} {:.2}", d.label(), d.score)).collect();
        println!("{} ({:?}): {}", frame.origin(), t.elapsed(), list.join(", "));
    }
    Ok(())
}
