//! `deskcam eval` on real labelled photos (`../shared/data/frames`, which CI has beside
//! the clone), and its errors on bad input.

use std::process::Command;

use deskcam_testkit::*;

fn deskcam() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deskcam"))
}

#[test]
fn eval_reports_per_class_and_rule_figures_as_json() {
    let Some(frames) = shared_frames() else {
        panic!("../shared/data/frames is missing: the evaluation needs the labelled photos");
    };
    let out = deskcam()
        .args(["eval", "--json", "--labels"])
        .arg(frames.join("labels.json"))
        .arg("--images")
        .arg(&frames)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(j["images"], 195);
    assert!(j["model"].as_str().unwrap().ends_with("nanodet.onnx"));
    for class in ["person", "cell phone", "book"] {
        for key in ["precision", "recall", "ap50"] {
            let v = j["classes"][class][key].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&v), "{class}.{key} = {v}");
        }
    }
    for rule in ["phone", "extra_person", "absent"] {
        assert!(j["rules"][rule]["precision"].is_f64() && j["rules"][rule]["recall"].is_f64(), "{rule}");
    }
    // The figures the model card states, as floors (a broken decoder or matcher drops
    // far below them).
    let f = |p: &str| j.pointer(p).and_then(|v| v.as_f64()).unwrap();
    assert!(f("/classes/person/ap50") > 0.6, "{j}");
    assert!(f("/rules/extra_person/recall") > 0.7 && f("/rules/absent/recall") > 0.9, "{j}");
    assert!(f("/rules/phone/recall") > 0.5, "{j}");
    let map = f("/map50");
    let mean = (f("/classes/person/ap50") + f("/classes/cell phone/ap50") + f("/classes/book/ap50")) / 3.0;
    assert!((map - mean).abs() < 1e-4);
    // Image-level-only photos count for the rules: 23 photos with a phone in all.
    assert_eq!(f("/rules/phone/tp") + f("/rules/phone/fn"), 23.0);
}

#[test]
fn eval_refuses_bad_labels_and_missing_photos_clearly() {
    let dir = tempdir("eval-bad");
    let labels = dir.join("labels.json");
    std::fs::write(&labels, "{\"not\": \"a list\"}").unwrap();
    let out = deskcam().args(["eval", "--labels"]).arg(&labels).arg("--images").arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a labels file"));

    std::fs::write(&labels, r#"[{"file": "nowhere.jpg", "objects": [], "image_level": {}}]"#).unwrap();
    std::fs::copy(demo_photos().join("basketball1.png"), dir.join("basketball1.png")).unwrap();
    let out = deskcam().args(["eval", "--labels"]).arg(&labels).arg("--images").arg(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nowhere.jpg") && err.contains("no labelled photo"), "{err}");
}
