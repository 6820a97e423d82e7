//! `deskcam eval`: the detector's accuracy on labelled photos (the format of
//! `../shared/data/frames/labels.json`), at the thresholds of a config.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use deskcam_core::board::{ModelForm, ModelPrecision};
use deskcam_core::eval::{parse_labels, Evaluation, Report, Scored, Thresholds};
use deskcam_core::Config;
use deskcam_vision::source::DirSource;
use deskcam_vision::{CaptureError, Detector, FrameSource};

/// Detections down to this score are kept for the precision-recall curve (AP); the
/// precision and recall columns are at the config's thresholds.
const CURVE_MIN_SCORE: f32 = 0.05;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The labels (`labels.json`: boxes and image-level facts per photo).
    #[arg(long)]
    labels: PathBuf,
    /// The directory holding the labelled photos.
    #[arg(long)]
    images: PathBuf,
    /// The model to evaluate [default: the installed model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// A device config whose rule thresholds are used [default: the built-in defaults].
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    let config = match &args.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
            match Config::from_toml(&text) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{}: {e}", p.display());
                    return Ok(ExitCode::from(2));
                }
            }
        }
        None => Config::default(),
    };
    let text = std::fs::read_to_string(&args.labels)
        .with_context(|| format!("reading labels {}", args.labels.display()))?;
    let labels = match parse_labels(&text) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}: not a labels file: {e}", args.labels.display());
            return Ok(ExitCode::from(2));
        }
    };
    let model = crate::model::locate(
        args.model.as_ref().or(config.detector.model.as_ref()),
        ModelForm::Onnx,
        ModelPrecision::Fp32,
    )
    .map_err(anyhow::Error::msg)?;
    let detector = Detector::load(&model, CURVE_MIN_SCORE, config.detector.nms_iou)
        .with_context(|| format!("loading {}", model.display()))?;
    let r = &config.rules;
    let thresholds = Thresholds {
        person: r.extra_person.min_score,
        phone: r.phone.min_score,
        book: r.paper.min_score,
        extra_person: r.extra_person.min_score,
        absent: r.absent.min_score,
    };
    let mut eval = Evaluation::new(thresholds);
    let mut source = DirSource::open(&args.images, false)?;
    // Photos are analysed offline here, never a camera: the simulated shutter token.
    let token = deskcam_hw::sim::simulated_open();
    let by_file: std::collections::HashMap<&str, usize> =
        labels.iter().enumerate().map(|(i, l)| (l.file.as_str(), i)).collect();
    let mut seen = vec![false; labels.len()];
    let (mut unlabelled, mut unreadable) = (0, 0);
    let start = Instant::now();
    loop {
        let frame = match source.next_frame(&token) {
            Ok(f) => f,
            Err(CaptureError::Exhausted) => break,
            Err(e) if e.is_skippable() => {
                eprintln!("eval: skipped: {e}");
                unreadable += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let Some(&i) = by_file.get(frame.origin()) else {
            unlabelled += 1;
            continue;
        };
        let found: Vec<Scored> = detector
            .detect(&frame)
            .with_context(|| format!("running the detector on {}", frame.origin()))?
            .iter()
            .map(|d| Scored { class: d.label().to_string(), score: d.score, bbox: d.bbox })
            .collect();
        eval.add(&labels[i], &found);
        seen[i] = true;
        let done = seen.iter().filter(|s| **s).count();
        if !args.json && done % 25 == 0 {
            eprintln!("eval: {done}/{} photos", labels.len());
        }
    }
    let missing: Vec<&str> =
        labels.iter().zip(&seen).filter(|(_, s)| !**s).map(|(l, _)| l.file.as_str()).collect();
    if !missing.is_empty() {
        eprintln!(
            "eval: {} labelled photo(s) not in {}: {}",
            missing.len(),
            args.images.display(),
            missing.iter().take(5).copied().collect::<Vec<_>>().join(", ")
        );
    }
    let report = eval.report();
    if report.images == 0 {
        eprintln!("eval: no labelled photo found in {}", args.images.display());
        return Ok(ExitCode::from(2));
    }
    let seconds = start.elapsed().as_secs_f32();
    if args.json {
        let mut j = serde_json::to_value(&report)?;
        j["model"] = model.display().to_string().into();
        j["sha256"] = detector.sha256().into();
        j["unlabelled"] = unlabelled.into();
        j["unreadable"] = unreadable.into();
        j["seconds"] = seconds.into();
        println!("{j}");
    } else {
        print_tables(&report, &model, detector.sha256(), seconds);
        if unlabelled + unreadable > 0 {
            println!("({unlabelled} photo(s) without labels and {unreadable} unreadable were skipped)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_tables(r: &Report, model: &std::path::Path, sha256: &str, seconds: f32) {
    println!(
        "deskcam eval: {} photos, model {} (sha256 {}…), {:.0} s",
        r.images,
        model.display(),
        &sha256[..sha256.len().min(12)],
        seconds
    );
    println!();
    println!(
        "{:<12} {:>9} {:>9} {:>7} {:>7} {:>6}",
        "class", "threshold", "precision", "recall", "AP50", "boxes"
    );
    for (name, c) in &r.classes {
        println!(
            "{:<12} {:>9.2} {:>9.3} {:>7.3} {:>7.3} {:>6}",
            name, c.threshold, c.precision, c.recall, c.ap50, c.boxes
        );
    }
    println!("{:<12} {:>43.3}", "mAP@0.5", r.map50);
    println!();
    println!(
        "{:<13} {:>9} {:>7} {:>4} {:>4} {:>4} {:>4}",
        "rule (image)", "precision", "recall", "tp", "fp", "fn", "tn"
    );
    for (name, x) in &r.rules {
        println!(
            "{:<13} {:>9.3} {:>7.3} {:>4} {:>4} {:>4} {:>4}",
            name, x.precision, x.recall, x.tp, x.fp, x.fn_, x.tn
        );
    }
}
