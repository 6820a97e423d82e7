//! Finding and checking the board config named by the device config's `board` key.

use std::path::PathBuf;

use deskcam_core::board::Board;

/// Directories searched in order: `$DESKCAM_BOARD_CONFIGS`, the installed location,
/// next to the binary, and the source tree this binary was built from (development).
fn dirs() -> Vec<PathBuf> {
    crate::model::installed("DESKCAM_BOARD_CONFIGS", "board-configs", "board-configs")
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
