//! `deskcam bench`: inference time per frame for one or more models at given thread
//! counts, and the whole scan path (photo read and decoded → detector → redacted
//! still), with the process's peak memory. `scripts/bench-detector` runs it on the host,
//! next to onnxruntime, and in an arm64 VM that counts instructions.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use deskcam_core::Config;
use deskcam_vision::detector::set_inference_threads;
use deskcam_vision::source::DirSource;
use deskcam_vision::{render_still, Detector, FrameSource};

use crate::telemetry::percentile;
use deskcam_core::alloc_count;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A model to time (repeat for several).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// A directory of photos: the first is the input of every run; the scan path loops
    /// over all of them.
    #[arg(long)]
    photos: PathBuf,
    /// Timed runs per model.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Untimed runs first (tract prepares lazily; caches warm up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Thread counts to time, e.g. `1,4`.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    threads: Vec<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Instead of timing, print where each model's inference time goes: per op kind and
    /// the slowest nodes of tract's optimised plan (per inference, each node's fastest of
    /// the runs, on one thread whatever `--threads` says; with `--json`, every node).
    #[arg(long)]
    profile: bool,
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 =
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if args.runs == 0 || args.threads.contains(&0) {
        eprintln!("deskcam bench: --runs and --threads must be at least 1");
        return Ok(ExitCode::from(2));
    }
    let token = deskcam_hw::sim::simulated_open();
    let first = DirSource::open(&args.photos, false)?.next_frame(&token)?;
    if args.profile {
        return profile(&args, &first);
    }
    let mut results = Vec::new();
    for &threads in &args.threads {
        if set_inference_threads(threads) != threads {
            eprintln!("deskcam bench: this build runs inference on one thread (cargo feature `multithread`)");
            continue;
        }
        for model in &args.models {
            let t = Instant::now();
            let det =
                Detector::load(model, 0.3, 0.5).with_context(|| format!("loading {}", model.display()))?;
            let load_ms = t.elapsed().as_secs_f64() * 1e3;
            for _ in 0..args.warmup {
                det.run_head(&first)?;
            }
            let (allocs0, bytes0) = alloc_count::count();
            let ms: Vec<f64> = (0..args.runs)
                .map(|_| {
                    let t = Instant::now();
                    det.run_head(&first).map(|_| t.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<_, _>>()?;
            // Counted over the timed runs (steady state), the timing vector included.
            let (allocs1, bytes1) = alloc_count::count();
            let allocs = (allocs1 - allocs0) as f64 / args.runs as f64;
            let alloc_mb = (bytes1 - bytes0) as f64 / args.runs as f64 / 1048576.0;
            let pick = |p| percentile(&ms, p).unwrap_or(0.0);
            let (median, p95) = (pick(0.5), pick(0.95));
            if !args.json {
                println!(
                    "{:<28} threads {threads}  median {median:9.2} ms  p95 {p95:9.2} ms  (load {load_ms:.0} ms)  {allocs:.0} allocations ({alloc_mb:.1} MB) per inference",
                    model.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                );
            }
            results.push(serde_json::json!({
                "model": model.display().to_string(), "threads": threads,
                "median_ms": median, "p95_ms": p95, "load_ms": load_ms, "allocs_per_inference": allocs,
                "alloc_mb_per_inference": alloc_mb,
            }));
        }
    }
    // The scan path with the first model on one thread: read and decode a photo,
    // pre-process, infer, decode, NMS, and render the redacted still for everything found.
    set_inference_threads(1);
    let det = Detector::load(&args.models[0], 0.3, 0.5)?;
    let evidence = Config::default().evidence;
    let mut source = DirSource::open(&args.photos, true)?;
    let mut ms = Vec::with_capacity(args.runs);
    // Where the time goes: reading and decoding the photo, the detector (pre-processing,
    // inference, decoding, NMS), and the redacted still.
    let mut stages: [Vec<f64>; 3] = Default::default();
    let (mut allocs, mut bytes) = (0u64, 0u64);
    for i in 0..args.runs + args.warmup {
        let (a0, b0) = alloc_count::count();
        let t = Instant::now();
        let frame = source.next_frame(&token)?;
        let t_read = t.elapsed();
        let found = det.detect(&frame)?;
        let t_detect = t.elapsed();
        let still = render_still(&frame, &found, &found, &evidence)?;
        std::hint::black_box(still);
        if i >= args.warmup {
            let total = t.elapsed();
            for (v, d) in stages.iter_mut().zip([t_read, t_detect - t_read, total - t_detect]) {
                v.push(d.as_secs_f64() * 1e3);
            }
            ms.push(total.as_secs_f64() * 1e3);
            let (a1, b1) = alloc_count::count();
            allocs += a1 - a0;
            bytes += b1 - b0;
        }
    }
    let scan_allocs = allocs as f64 / args.runs as f64;
    let scan_mb = bytes as f64 / args.runs as f64 / 1048576.0;
    let scan = percentile(&ms, 0.5).unwrap_or(0.0);
    let [read_ms, detect_ms, still_ms] = stages.map(|v| percentile(&v, 0.5).unwrap_or(0.0));
    let rss = peak_rss_mb();
    if args.json {
        let j = serde_json::json!({
            "runs": args.runs, "results": results, "scan_path_ms": scan, "peak_rss_mb": rss,
            "scan_path_allocs_per_frame": scan_allocs, "scan_path_alloc_mb_per_frame": scan_mb,
            "scan_path_stages_ms": {"read": read_ms, "detect": detect_ms, "still": still_ms},
        });
        println!("{j}");
    } else {
        println!("scan path (photo → detector → still), 1 thread: median {scan:.2} ms");
        println!(
            "  stages (medians): photo read {read_ms:.2} ms, detector {detect_ms:.2} ms, still {still_ms:.2} ms"
        );
        println!(
            "allocations per frame on the scan path: {scan_allocs:.0} ({scan_mb:.1} MB; the photo decode and the JPEG still included)"
        );
        if let Some(r) = rss {
            println!("peak RSS {r:.1} MB");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--profile`: each model's plan timed node by node, grouped by op kind.
fn profile(args: &BenchArgs, frame: &deskcam_vision::Frame) -> Result<ExitCode> {
    set_inference_threads(1);
    let mut out = Vec::new();
    for model in &args.models {
        let det = Detector::load(model, 0.3, 0.5).with_context(|| format!("loading {}", model.display()))?;
        let nodes = det.profile(frame, args.warmup, args.runs, &|| alloc_count::count().0)?;
        let total: f64 = nodes.iter().map(|n| n.seconds).sum();
        let total_allocs: u64 = nodes.iter().map(|n| n.allocations).sum();
        // (op, seconds, nodes, allocations)
        let mut kinds: Vec<(String, f64, usize, u64)> = Vec::new();
        for n in &nodes {
            match kinds.iter_mut().find(|k| k.0 == n.op) {
                Some(k) => {
                    k.1 += n.seconds;
                    k.2 += 1;
                    k.3 += n.allocations;
                }
                None => kinds.push((n.op.clone(), n.seconds, 1, n.allocations)),
            }
        }
        kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut slowest: Vec<_> = nodes.iter().collect();
        slowest.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        if args.json {
            out.push(serde_json::json!({
                "model": model.display().to_string(), "total_ms": total * 1e3, "allocations": total_allocs,
                "ops": kinds.iter().map(|(op, s, count, allocs)| serde_json::json!({"op": op, "ms": s * 1e3, "nodes": count, "allocations": allocs})).collect::<Vec<_>>(),
                "slowest": slowest.iter().map(|n| serde_json::json!({"name": n.name, "op": n.op, "ms": n.seconds * 1e3, "allocations": n.allocations, "info": n.info})).collect::<Vec<_>>(),
            }));
            continue;
        }
        println!(
            "{}: {:.2} ms per inference in the plan's nodes (each its fastest run), {total_allocs} allocations in them",
            model.display(),
            total * 1e3
        );
        for (op, s, count, allocs) in &kinds {
            println!(
                "  {op:<28} {:9.3} ms {:5.1} %  ({count} nodes, {allocs} allocations)",
                s * 1e3,
                100.0 * s / total
            );
        }
        println!("  slowest nodes:");
        for n in slowest.iter().take(25) {
            let ms = n.seconds * 1e3;
            println!("    {ms:8.3} ms  {:<22} {}  {}", n.op, n.name, n.info);
        }
    }
    if args.json {
        println!("{}", serde_json::Value::Array(out));
    }
    Ok(ExitCode::SUCCESS)
}
