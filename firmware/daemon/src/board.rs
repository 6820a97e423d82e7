//! Finding and checking the board config named by the device config's `board` key.

use std::path::PathBuf;

use deskcam_core::board::Board;

/// Directories searched in order: `$DESKCAM_BOARD_CONFIGS`, the installed location,
/// next to the binary, and the source tree this binary was built from (development).
fn dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("DESKCAM_BOARD_CONFIGS") {
        dirs.push(PathBuf::from(p));
    }
    dirs.push(PathBuf::from("/usr/share/deskcam/board-configs"));
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.to_path_buf())) {
        dirs.push(dir.join("board-configs"));
        dirs.push(dir.join("../share/deskcam/board-configs"));
    }
    dirs.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../board-configs")));
    dirs
}

/// Loads and validates `<name>.toml`; the error names the file, or every place looked.
pub fn load(name: &str) -> Result<(PathBuf, Board), String> {
    let searched = dirs();
    let Some(path) = searched.iter().map(|d| d.join(format!("{name}.toml"))).find(|p| p.is_file()) else {
        let list: Vec<String> = searched.iter().map(|p| p.display().to_string()).collect();
        return Err(format!(
            "board: no board config '{name}.toml'; looked in: {} (set DESKCAM_BOARD_CONFIGS)",
            list.join(", ")
        ));
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("board: {}: {e}", path.display()))?;
    let board = Board::from_toml(name, &text).map_err(|e| format!("board: {}:\n{e}", path.display()))?;
    Ok((path, board))
}
