//! Photos from a directory, in file-name order, optionally looped.

use std::path::{Path, PathBuf};

use deskcam_hw::ShutterOpen;

use super::{CaptureError, FrameSource};
use crate::Frame;

pub struct DirSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    next: usize,
    looped: bool,
}

/// The photo types this build reads (PNG with the `png` feature: the demo's photos).
const KINDS: &str = if cfg!(feature = "png") { ".jpg, .jpeg or .png" } else { ".jpg or .jpeg" };

fn is_photo(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    matches!(ext.as_deref(), Some("jpg" | "jpeg")) || (cfg!(feature = "png") && ext.as_deref() == Some("png"))
}

impl DirSource {
    pub fn open(dir: &Path, looped: bool) -> Result<Self, CaptureError> {
        let bad = |reason: String| CaptureError::BadDirectory { path: dir.to_path_buf(), reason };
        let entries = std::fs::read_dir(dir).map_err(|e| bad(e.to_string()))?;
        let mut files: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_photo(p)).collect();
        files.sort();
        if files.is_empty() {
            return Err(bad(format!("holds no {KINDS} files")));
        }
        Ok(DirSource { dir: dir.to_path_buf(), files, next: 0, looped })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl FrameSource for DirSource {
    fn next_frame(&mut self, _shutter: &ShutterOpen) -> Result<Frame, CaptureError> {
        // A directory that went away is a camera that was unplugged: a source fault,
        // not a bad photo to skip.
        if !self.dir.is_dir() {
            return Err(CaptureError::Missing { path: self.dir.clone() });
        }
        if self.next >= self.files.len() {
            if !self.looped {
                return Err(CaptureError::Exhausted);
            }
            self.next = 0;
        }
        let path = &self.files[self.next];
        self.next += 1;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let img = image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(|e| CaptureError::Corrupt { path: path.clone(), reason: e.to_string() })?
            .decode()
            .map_err(|e| CaptureError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        Ok(Frame::new(img.to_rgb8(), name))
    }

    fn describe(&self) -> String {
        format!(
            "{} photos in {}{}",
            self.files.len(),
            self.dir.display(),
            if self.looped { " (looped)" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("deskcam-dirsrc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn yields_photos_in_order_reports_corrupt_ones_and_loops() {
        let d = tmpdir("order");
        image::RgbImage::from_pixel(4, 3, image::Rgb([1, 2, 3])).save(d.join("a.png")).unwrap();
        std::fs::write(d.join("b.jpg"), b"this is not a jpeg").unwrap();
        image::RgbImage::from_pixel(6, 5, image::Rgb([9, 9, 9])).save(d.join("c.png")).unwrap();
        std::fs::write(d.join("notes.txt"), b"ignored").unwrap();
        let token = deskcam_hw::sim::simulated_open();

        let mut s = DirSource::open(&d, false).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.next_frame(&token).unwrap().origin(), "a.png");
        let err = s.next_frame(&token).unwrap_err();
        assert!(err.is_skippable() && err.to_string().contains("b.jpg"), "{err}");
        assert_eq!(s.next_frame(&token).unwrap().width(), 6);
        assert!(matches!(s.next_frame(&token), Err(CaptureError::Exhausted)));

        let mut s = DirSource::open(&d, true).unwrap();
        for _ in 0..3 {
            let _ = s.next_frame(&token);
        }
        assert_eq!(s.next_frame(&token).unwrap().origin(), "a.png", "loops back");
        // Unplugged: the directory went away. A fault of the source, not a photo to skip.
        let gone = d.with_extension("unplugged");
        let _ = std::fs::remove_dir_all(&gone);
        std::fs::rename(&d, &gone).unwrap();
        let err = s.next_frame(&token).unwrap_err();
        assert!(matches!(err, CaptureError::Missing { .. }) && !err.is_skippable(), "{err}");
        std::fs::rename(&gone, &d).unwrap();
        // Back: the next photo in turn (the broken one) is read again.
        assert!(s.next_frame(&token).unwrap_err().to_string().contains("b.jpg"));
    }

    #[test]
    fn missing_or_empty_directory_is_a_clear_error() {
        let e = DirSource::open(Path::new("/nonexistent/photos"), false).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/photos"), "{e}");
        let d = tmpdir("empty");
        let e = DirSource::open(&d, false).err().unwrap();
        assert!(e.to_string().contains("no .jpg"), "{e}");
    }
}
