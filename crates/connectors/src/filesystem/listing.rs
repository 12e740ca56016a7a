//! Which files a `path` option means, and how they are split among source subtasks.

use std::path::{Path, PathBuf};

use nagare_engine::EngineError;

/// Whether a file is skipped when listing: hidden files and files still being written by convention.
pub fn is_ignored(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return true };
    name.starts_with('.') || name.starts_with('_') || name.ends_with(".inprogress") || name.ends_with(".tmp")
}

/// Whether `path` is a glob pattern.
pub fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// The files `path` (a file, a directory walked recursively, or a glob) names now, sorted.
pub fn list_files(path: &str) -> Result<Vec<PathBuf>, EngineError> {
    let mut files = Vec::new();
    if is_glob(path) {
        let entries =
            glob::glob(path).map_err(|e| EngineError::Config(format!("option 'path': invalid glob '{path}': {e}")))?;
        for entry in entries {
            let p = entry.map_err(|e| EngineError::io(format!("listing {path}"), e.into()))?;
            if p.is_file() && !is_ignored(&p) {
                files.push(p);
            }
        }
    } else {
        let p = PathBuf::from(path);
        if p.is_dir() {
            walk(&p, &mut files)?;
        } else if p.is_file() {
            files.push(p);
        } else if !p.exists() {
            return Err(EngineError::io(
                format!("option 'path': {path}"),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
    }
    files.sort();
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(format!("listing {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| EngineError::io(format!("listing {}", dir.display()), e))?;
        let p = entry.path();
        if is_ignored(&p) {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// A piece of input one subtask reads: a byte range of a file (or the whole file), or what is left of one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Split {
    /// The file.
    pub path: PathBuf,
    /// First byte (lines starting at or after it belong to this split).
    pub start: u64,
    /// End: lines starting before it belong to this split; `None` means to the end of the file.
    pub end: Option<u64>,
    /// Resuming: `start` is the beginning of a line (no partial line to skip, no header).
    #[serde(default)]
    pub resume: Option<Resume>,
}

/// Where reading of a split resumes after a restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resume {
    /// Bytes of the (decompressed) stream already read, from the split's start.
    pub bytes: u64,
    /// Line number of the next line, when known.
    pub line: Option<u64>,
    /// Parquet: rows already read.
    pub rows: u64,
}

/// Cuts files into splits: uncompressed line-oriented files larger than `split_size` are cut into byte ranges,
/// everything else is one split per file.
pub fn plan_splits(
    files: &[PathBuf],
    splittable: impl Fn(&Path) -> bool,
    split_size: u64,
) -> Result<Vec<Split>, EngineError> {
    let mut splits = Vec::new();
    for f in files {
        let len = std::fs::metadata(f).map_err(|e| EngineError::io(format!("reading {}", f.display()), e))?.len();
        if splittable(f) && split_size > 0 && len > split_size {
            let mut start = 0;
            while start < len {
                let end = (start + split_size).min(len);
                splits.push(Split { path: f.clone(), start, end: Some(end), resume: None });
                start = end;
            }
        } else {
            splits.push(Split { path: f.clone(), start: 0, end: None, resume: None });
        }
    }
    Ok(splits)
}

/// The splits subtask `index` of `parallelism` reads: every `parallelism`-th, so that subtasks advance through the
/// input (and event time) side by side.
pub fn assign(splits: Vec<Split>, index: usize, parallelism: usize) -> Vec<Split> {
    splits.into_iter().enumerate().filter(|(i, _)| i % parallelism.max(1) == index).map(|(_, s)| s).collect()
}

/// The subtask that owns a file discovered while watching (stable across restarts and subtasks).
pub fn owner_of(path: &Path, parallelism: usize) -> usize {
    let h = xxhash_rust::xxh3::xxh3_64(path.to_string_lossy().as_bytes());
    (h % parallelism.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_files_and_assignment_interleaves() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b'x'; 250]).unwrap();
        let small = dir.path().join("small.json.gz");
        std::fs::write(&small, b"x").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        std::fs::write(dir.path().join("part.inprogress"), b"x").unwrap();
        let files = list_files(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(files, vec![big.clone(), small.clone()]);
        let splits = plan_splits(&files, |p| p.extension().is_some_and(|e| e == "json"), 100).unwrap();
        assert_eq!(splits.len(), 4);
        assert_eq!(splits[2], Split { path: big, start: 200, end: Some(250), resume: None });
        assert_eq!(splits[3].end, None);
        let mine = assign(splits, 1, 2);
        assert_eq!(mine.iter().map(|s| s.start).collect::<Vec<_>>(), vec![100, 0]);
    }

    #[test]
    fn globs_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), b"1").unwrap();
        std::fs::write(dir.path().join("b.json"), b"1").unwrap();
        let pattern = format!("{}/*.csv", dir.path().display());
        assert_eq!(list_files(&pattern).unwrap().len(), 1);
        assert!(list_files(&format!("{}/nope", dir.path().display())).is_err());
    }
}
