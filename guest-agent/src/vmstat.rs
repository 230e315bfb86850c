//! `vmstat`: the guest's /proc/vmstat counters.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum VmstatError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl VmstatError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Read { source, .. } => crate::sys::errno_of(source),
        }
    }
}

/// Reads `<root>/proc/vmstat`.
pub fn read(root: &Path) -> Result<BTreeMap<String, u64>, VmstatError> {
    let path = root.join("proc/vmstat");
    let text = fs::read_to_string(&path).map_err(|source| VmstatError::Read { path, source })?;
    Ok(parse(&text))
}

/// `name value` per line; lines that are not exactly that (or whose value is not a u64)
/// are skipped.
pub fn parse(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(name), Some(value), None) => Some((name.to_owned(), value.parse().ok()?)),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::tests::Fixture;

    #[test]
    fn parses_counters_and_skips_junk() {
        let text = "nr_free_pages 12345\npgmigrate_success 7\n\nbad\nnr_x -1\nnr_y 1 2\nnr_z 18446744073709551615\n";
        let counters = parse(text);
        assert_eq!(
            counters,
            BTreeMap::from([
                ("nr_free_pages".to_owned(), 12345),
                ("pgmigrate_success".to_owned(), 7),
                ("nr_z".to_owned(), u64::MAX),
            ])
        );
    }

    #[test]
    fn reads_from_the_root() {
        let fx = Fixture::new("vmstat");
        fx.file("proc/vmstat", "nr_free_pages 3\n");
        assert_eq!(read(&fx.0).unwrap()["nr_free_pages"], 3);
        assert_eq!(
            read(Path::new("/nonexistent")).unwrap_err().errno(),
            libc::ENOENT
        );
        assert!(read(Path::new("/")).unwrap().contains_key("nr_free_pages"));
    }
}
