//! Guard against feature creep (privacy invariant 4): no crate that records audio or
//! recognises faces enters the dependency tree, and no source file opens an audio
//! device. Runs on the workspace's Cargo.lock (every dependency, dev ones included)
//! and on every Rust source of the firmware.

use std::path::{Path, PathBuf};

use deskcam_testkit::repo;

/// Crates that capture or play audio, or detect/recognise faces.
const BANNED: &[&str] = &[
    "cpal",
    "rodio",
    "alsa",
    "alsa-sys",
    "portaudio",
    "portaudio-rs",
    "portaudio-sys",
    "libpulse-binding",
    "libpulse-sys",
    "libpulse-simple-binding",
    "psimple",
    "pulse",
    "jack",
    "jack-sys",
    "coreaudio-rs",
    "coreaudio-sys",
    "openal",
    "openal-sys",
    "sdl2",
    "sdl2-sys",
    "gstreamer",
    "gstreamer-audio",
    "pipewire",
    "pipewire-sys",
    "whisper-rs",
    "vosk",
    "rustface",
    "dlib-face-recognition",
    "dlib-face-recognition-sys",
    "rust-faces",
    "opencv",
    "face-detection",
    "facial-recognition",
    "insightface",
    "arcface",
];
/// Substrings that mark such crates whatever their exact name.
const BANNED_PARTS: &[&str] =
    &["audio", "microphone", "speech", "face-rec", "face_rec", "facerec", "face-det", "facedet"];

fn locked_packages() -> Vec<String> {
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).expect("Cargo.lock at the workspace root");
    lock.lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|n| n.trim_end_matches('"').to_string())
        .collect()
}

fn banned(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    BANNED.contains(&n.as_str()) || BANNED_PARTS.iter().any(|p| n.contains(p))
}

#[test]
fn no_audio_or_face_recognition_crate_is_a_dependency() {
    let packages = locked_packages();
    assert!(packages.len() > 100, "Cargo.lock was not read properly");
    let found: Vec<&String> = packages.iter().filter(|p| banned(p)).collect();
    assert!(found.is_empty(), "banned crates in the dependency tree: {found:?}");
}

#[test]
fn the_ban_list_catches_what_it_should() {
    for name in
        ["cpal", "alsa-sys", "libpulse-binding", "rustface", "my-audio-thing", "dlib-face-recognition"]
    {
        assert!(banned(name), "{name} should be banned");
    }
    for name in ["tract-onnx", "rumqttc", "v4l", "image", "portable-atomic", "interface-macros"] {
        assert!(!banned(name), "{name} is fine");
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_code_opens_an_audio_device() {
    let mut files = Vec::new();
    rust_files(&repo().join("firmware"), &mut files);
    assert!(files.len() > 10);
    let this = file!().rsplit('/').next().unwrap_or_default();
    // Device nodes and APIs an audio capture would need.
    let markers = ["/dev/snd", "/dev/dsp", "/dev/audio", "snd_pcm", "SNDRV_", "alsa::", "pcm_open"];
    for f in files.iter().filter(|f| !f.ends_with(this)) {
        let text = std::fs::read_to_string(f).unwrap();
        for m in markers {
            assert!(!text.contains(m), "{} mentions {m}", f.display());
        }
    }
}
