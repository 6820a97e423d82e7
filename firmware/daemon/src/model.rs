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
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("DESKCAM_MODEL") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(PathBuf::from("/usr/share/deskcam/nanodet.onnx"));
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.to_path_buf())) {
        candidates.push(dir.join("nanodet.onnx"));
        candidates.push(dir.join("../share/deskcam/nanodet.onnx"));
    }
    candidates.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/nanodet.onnx")));
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        format!(
            "no detector model found; looked in: {} (set detector.model or DESKCAM_MODEL)",
            list.join(", ")
        )
    })
}
