//! Where the detector model is found when the config says `model = "auto"`.

use std::path::PathBuf;

use deskcam_core::board::{ModelForm, ModelPrecision};

/// The committed model a board's precision names, and the file name of its form.
pub fn file_name(form: ModelForm, precision: ModelPrecision) -> &'static str {
    match (precision, form) {
        (ModelPrecision::Fp32, ModelForm::Onnx) => "nanodet.onnx",
        (ModelPrecision::Fp32, ModelForm::Nnef) => "nanodet.nnef.tar",
        (ModelPrecision::Int8, ModelForm::Onnx) => "nanodet-int8-qlinear.onnx",
        (ModelPrecision::Int8, ModelForm::Nnef) => "nanodet-int8-qlinear.nnef.tar",
    }
}

/// Candidates in order: `$DESKCAM_MODEL`, the installed location, next to the binary,
/// and the source tree this binary was built from (development and CI). The board's
/// model form and precision pick the file (`file_name`).
pub fn locate(
    explicit: Option<&PathBuf>,
    form: ModelForm,
    precision: ModelPrecision,
) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("detector.model: {} does not exist", p.display()))
        };
    }
    let name = file_name(form, precision);
    // The NNEF files are made from the ONNX ones by `deskcam model export-nnef` (the
    // image build does).
    let candidates = installed("DESKCAM_MODEL", name, &format!("models/{name}"));
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        let hint = match form {
            ModelForm::Onnx => String::new(),
            ModelForm::Nnef => format!(
                "; the board loads the NNEF form: `deskcam model export-nnef models/{} models/{name}` on a development machine",
                file_name(ModelForm::Onnx, precision)
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boards_precision_picks_the_committed_model() {
        // The ONNX files are in the source tree: found there, the one the precision names.
        let fp32 = locate(None, ModelForm::Onnx, ModelPrecision::Fp32).unwrap();
        let int8 = locate(None, ModelForm::Onnx, ModelPrecision::Int8).unwrap();
        assert!(fp32.ends_with("models/nanodet.onnx"), "{}", fp32.display());
        assert!(int8.ends_with("models/nanodet-int8-qlinear.onnx"), "{}", int8.display());
        assert_eq!(file_name(ModelForm::Nnef, ModelPrecision::Int8), "nanodet-int8-qlinear.nnef.tar");
        // The NNEF form is not committed: the error says how to make the one that is missing.
        let e = locate(None, ModelForm::Nnef, ModelPrecision::Int8).unwrap_err();
        assert!(
            e.contains("export-nnef models/nanodet-int8-qlinear.onnx models/nanodet-int8-qlinear.nnef.tar"),
            "{e}"
        );
        let missing = std::env::temp_dir().join("deskcam-no-such-model.nnef.tar");
        assert!(locate(Some(&missing), ModelForm::Nnef, ModelPrecision::Int8)
            .unwrap_err()
            .contains("does not exist"));
    }
}
