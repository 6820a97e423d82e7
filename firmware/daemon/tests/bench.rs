//! `deskcam bench`: its figures as JSON, and `--profile`, which shows where the
//! inference time goes in tract's optimised plan. The profile also pins what the int8
//! model's rewrites are for: tract gathers no int8 patches of a stride-1 convolution
//! itself, and no float pass is left around the max-pool.

use std::process::Command;

use deskcam_testkit::*;
use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let models = repo().join("models");
    let out = Command::new(env!("CARGO_BIN_EXE_deskcam"))
        .args(["bench", "--json", "--warmup", "1", "--photos"])
        .arg(demo_photos())
        .arg("--model")
        .arg(models.join("nanodet.onnx"))
        .arg("--model")
        .arg(models.join("nanodet-int8-qlinear.onnx"))
        .args(args)
        // The plan the detector ships, whatever the shell running the tests has set.
        .env_remove("DESKCAM_TRACT_CONV")
        .env_remove("DESKCAM_NO_WINOGRAD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON value")
}

/// Milliseconds per op kind in one model's profile.
fn op_ms(profile: &Value, op: &str) -> Option<f64> {
    profile["ops"].as_array().unwrap().iter().find(|o| o["op"] == op).map(|o| o["ms"].as_f64().unwrap())
}

#[test]
fn bench_prints_its_figures_as_json() {
    let j = bench(&["--runs", "1"]);
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert!(r["median_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["allocs_per_inference"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(j["scan_path_ms"].as_f64().unwrap() > 0.0);
    assert!(j["peak_rss_mb"].as_f64().unwrap() > 10.0);
}

#[test]
fn profile_shows_where_the_inference_time_goes() {
    // Three runs: each node counts its fastest, so a preempted node does not skew it.
    let j = bench(&["--profile", "--runs", "3"]);
    let [fp32, int8] = j.as_array().unwrap().as_slice() else { panic!("two models: {j}") };
    for p in [fp32, int8] {
        let total = p["total_ms"].as_f64().unwrap();
        let ops: f64 = p["ops"].as_array().unwrap().iter().map(|o| o["ms"].as_f64().unwrap()).sum();
        assert!(total > 0.0 && (ops - total).abs() < 1e-6 * total.max(1.0), "{total} against {ops}");
        // Every node of the plan is listed, slowest first.
        let ms: Vec<f64> =
            p["slowest"].as_array().unwrap().iter().map(|n| n["ms"].as_f64().unwrap()).collect();
        assert!(ms.len() > 100 && ms.windows(2).all(|w| w[0] >= w[1]), "{} nodes", ms.len());
    }
    // The float model's time is its convolutions: tract's matrix products, and on an x86
    // with AVX2 the detector's direct convolution for the layers with few channels
    // (direct_conv.rs) and the transforms of Winograd's for those with many (winograd.rs).
    let direct = op_ms(fp32, "DeskcamDirectConv3x3");
    let winograd = ["DeskcamWinogradInput", "DeskcamWinogradOutput"].map(|op| op_ms(fp32, op));
    #[cfg(target_arch = "x86_64")]
    assert!(winograd.iter().all(Option::is_some), "{}", fp32["ops"]);
    let convs = op_ms(fp32, "OptMatMul").unwrap()
        + direct.unwrap_or(0.0)
        + winograd.iter().map(|ms| ms.unwrap_or(0.0)).sum::<f64>();
    assert!(convs > 0.5 * fp32["total_ms"].as_f64().unwrap(), "{}", fp32["ops"]);
    #[cfg(target_arch = "x86_64")]
    assert_eq!(direct.is_some(), is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
    // The int8 model: tract gathers no patches itself (Im2col; the model's plain ops
    // gather them, at stride 2 too), and the max-pool reads and writes int8 (no
    // DequantizeLinear in front of it, which there was before the rewrite). (That the
    // packing for tract's dot-product kernels is the detector's own is int8_pack.rs's
    // test: which products get that kernel depends on the CPU.)
    let gathers = int8["slowest"].as_array().unwrap().iter().filter(|n| n["op"] == "Im2col").count();
    assert_eq!(gathers, 0, "{}", int8["ops"]);
    assert!(op_ms(int8, "OptMaxPool").is_some() && op_ms(int8, "DequantizeLinearF32").is_some());
    assert!(
        !int8["slowest"].as_array().unwrap().iter().any(|n| n["op"] == "DequantizeLinearF32"
            && n["name"].as_str().unwrap().starts_with("Conv__145")),
        "the first convolution's output goes to the max-pool as int8"
    );
}
