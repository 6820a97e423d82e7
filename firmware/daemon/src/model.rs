//! Where the detector model is found when the config says `model = "auto"`.

use std::path::PathBuf;

use deskcam_core::board::ModelForm;

/// Candidates in order: `$DESKCAM_MODEL`, the installed location, next to the binary,
/// and the source tree this binary was built from (development and CI). The board's
/// model form picks `nanodet.onnx` or `nanodet.nnef.tar`.
pub fn locate(explicit: Option<&PathBuf>, form: ModelForm) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("detector.model: {} does not exist", p.display()))
        };
    }
    let candidates = match form {
        ModelForm::Onnx => installed("DESKCAM_MODEL", "nanodet.onnx", "models/nanodet.onnx"),
        // Made from the ONNX model by `deskcam model export-nnef` (the image build does).
        ModelForm::Nnef => installed("DESKCAM_MODEL", "nanodet.nnef.tar", "models/nanodet.nnef.tar"),
    };
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        let hint = match form {
            ModelForm::Onnx => "",
            ModelForm::Nnef => "; the board loads the NNEF form: `deskcam model export-nnef models/nanodet.onnx models/nanodet.nnef.tar` on a development machine",
        };
        format!(
            "no detector model found; looked in: {} (set detector.model or DESKCAM_MODEL){hint}",
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
