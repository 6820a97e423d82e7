//! Where the detector model is found when the config says `model = "auto"`.

use std::path::PathBuf;

/// Candidates in order: `$DESKCAM_MODEL`, the installed location, next to the binary,
/// and the source tree this binary was built from (development and CI).
pub fn locate(explicit: Option<&PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("detector.model: {} does not exist", p.display()))
        };
    }
    let candidates = installed("DESKCAM_MODEL", "nanodet.onnx", "models/nanodet.onnx");
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        format!(
            "no detector model found; looked in: {} (set detector.model or DESKCAM_MODEL)",
            list.join(", ")
        )
    })
}

/// Where an installed file is looked for, in order: the path in `env`, the installed
/// location `/usr/share/deskcam/<name>`, next to the binary (and its `../share`), and
/// `<source>` in the source tree this binary was built from (development and CI).
pub fn installed(env: &str, name: &str, source: &str) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os(env) {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(PathBuf::from("/usr/share/deskcam").join(name));
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.to_path_buf())) {
        candidates.push(dir.join(name));
        candidates.push(dir.join("../share/deskcam").join(name));
    }
    candidates.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(source));
    candidates
}
