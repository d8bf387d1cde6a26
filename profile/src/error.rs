//! The one error type of profile loading: where (file, line, field path) and what.

use std::fmt;

/// One problem in a profile file, located as precisely as known.
///
/// Displayed as `{file}:{line}: {path}: {message}`; the line is left out when unknown (e.g. a
/// file that cannot be read) and the path when the problem concerns the whole document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileError {
    /// The file (as given to the loader).
    pub file: String,
    /// 1-based line in the file, counted from the file's start (also in later documents).
    pub line: Option<usize>,
    /// Field path inside the document, e.g. `spec.properties[2].visitors.modbus.offset`; empty
    /// for the document as a whole.
    pub path: String,
    /// What is wrong, and where possible how to fix it.
    pub message: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProfileError {}
