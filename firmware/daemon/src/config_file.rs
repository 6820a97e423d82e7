//! Saving the config file (and, at first boot, the certificates beside it) so that a
//! power cut at any moment leaves either the old file or the new one, never a mix: write
//! a temporary file beside it, sync it, rename it over the old one, sync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `header` (comment lines) goes before `text`. The file is created readable by its
/// owner only: it may hold the broker password.
pub fn save(path: &Path, header: &str, text: &str) -> io::Result<()> {
    let dir = dir_of(path);
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(".{}.new", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    let written = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).and_then(|mut f| {
        f.write_all(header.as_bytes())?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// The directory a file is in (`.` for a bare file name).
pub fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes the directory's entries (a rename, a removal) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_or_keeps_the_old_file() {
        let dir = std::env::temp_dir().join(format!("deskcam-config-file-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("deskcam.toml");
        fs::write(&path, "old = 1\n").unwrap();
        save(&path, "# h\n", "new = 2\n").unwrap();
        assert!(fs::read_to_string(&path).unwrap().ends_with("new = 2\n"));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        // A directory that cannot be written: the error is returned, the old file stays.
        let missing = dir.join("gone/deskcam.toml");
        assert!(save(&missing, "", "x = 1\n").is_err());
        assert!(fs::read_to_string(&path).unwrap().ends_with("new = 2\n"));
        let _ = fs::remove_dir_all(&dir);
    }
}
