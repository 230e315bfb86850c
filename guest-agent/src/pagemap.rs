//! Where the pages of a mapping are: /proc/self/pagemap (one u64 per virtual page: bit
//! 63 present, bits 0-54 the page frame number), summed per memory block.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use agent_protocol::BlockPages;
use thiserror::Error;

use crate::memory::PAGE_SIZE;

/// Bytes of pagemap read at once (8192 pages).
const CHUNK: usize = 64 << 10;
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

#[derive(Debug, Error)]
pub enum PagemapError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} hides page frame numbers (the agent needs CAP_SYS_ADMIN)")]
    HiddenPfns(PathBuf),
}

impl PagemapError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Read { source, .. } => crate::sys::errno_of(source),
            Self::HiddenPfns(_) => libc::EPERM,
        }
    }
}

/// Present pages of this process's `addr..addr + len` per memory block of `block_size`
/// bytes, from `<root>/proc/self/pagemap`, sorted by block, each with the block's node.
/// Pages not present (never touched, or swapped out) are not counted.
pub fn pages_per_block(
    root: &Path,
    addr: usize,
    len: usize,
    block_size: u64,
) -> Result<Vec<BlockPages>, PagemapError> {
    let path = root.join("proc/self/pagemap");
    let file = open(&path)?;
    let first = addr as u64 / PAGE_SIZE;
    let pages = (len as u64).div_ceil(PAGE_SIZE);
    let mut blocks =
        count_per_block(&file, first, pages, block_size).map_err(|e| e.with_path(path))?;
    for b in &mut blocks {
        // Informative: a block whose node cannot be read is reported without one.
        b.node = crate::memory::block_node(root, b.block).ok().flatten();
    }
    Ok(blocks)
}

/// Opens a pagemap file (`/proc/<pid>/pagemap`).
pub fn open(path: &Path) -> Result<File, PagemapError> {
    File::open(path).map_err(|source| PagemapError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A failure reading pagemap entries, before the file's path is known.
#[derive(Debug)]
pub enum Counted {
    Io(io::Error),
    Hidden,
}

impl Counted {
    pub fn with_path(self, path: PathBuf) -> PagemapError {
        match self {
            Counted::Io(source) => PagemapError::Read { path, source },
            Counted::Hidden => PagemapError::HiddenPfns(path),
        }
    }
}

/// Counts the present pages among entries `first..first + pages` of `pagemap` per block.
fn count_per_block(
    pagemap: &File,
    first: u64,
    pages: u64,
    block_size: u64,
) -> Result<Vec<BlockPages>, Counted> {
    let pages_per_block = (block_size / PAGE_SIZE).max(1);
    let mut per_block = BTreeMap::<u32, u64>::new();
    for_each_present(pagemap, first, pages, |_, pfn| {
        let block = u32::try_from(pfn / pages_per_block).unwrap_or(u32::MAX);
        *per_block.entry(block).or_default() += 1;
    })?;
    Ok(per_block
        .into_iter()
        .map(|(block, pages)| BlockPages {
            block,
            pages,
            node: None,
        })
        .collect())
}

/// Calls `each(virtual page number, pfn)` for every present page among the entries
/// `first..first + pages` of `pagemap`, reading [`CHUNK`] bytes at a time.
pub fn for_each_present(
    pagemap: &File,
    first: u64,
    pages: u64,
    mut each: impl FnMut(u64, u64),
) -> Result<(), Counted> {
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0;
    while done < pages {
        let want = usize::try_from(pages - done)
            .unwrap_or(usize::MAX)
            .min(CHUNK / 8)
            * 8;
        let offset = first
            .checked_add(done)
            .and_then(|page| page.checked_mul(8))
            .ok_or(Counted::Io(io::ErrorKind::InvalidInput.into()))?;
        let mut got = 0;
        while got < want {
            match pagemap.read_at(&mut buf[got..want], offset + got as u64) {
                Ok(0) => return Err(Counted::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Counted::Io(e)),
            }
        }
        for (i, entry) in buf[..want].chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            if entry & PRESENT == 0 {
                continue;
            }
            let pfn = entry & PFN_MASK;
            if pfn == 0 {
                return Err(Counted::Hidden);
            }
            each(first + done + i as u64, pfn);
        }
        done += (want / 8) as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::tests::Fixture;

    const MIB: u64 = 1 << 20;

    #[test]
    fn counting_per_block() {
        let fx = Fixture::new("pagemap");
        let mut bytes = Vec::new();
        for pfn in [5, 6, 40_000, 0x8000] {
            bytes.extend_from_slice(&(PRESENT | pfn).to_le_bytes());
        }
        bytes.extend_from_slice(&0x1234u64.to_le_bytes()); // not present
        let path = fx.0.join("pagemap");
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let blocks = count_per_block(&file, 0, 5, 128 * MIB).ok().unwrap();
        let summary: Vec<(u32, u64)> = blocks.iter().map(|b| (b.block, b.pages)).collect();
        assert_eq!(summary, [(0, 2), (1, 2)]);
        let blocks = count_per_block(&file, 2, 3, 128 * MIB).ok().unwrap();
        let summary: Vec<(u32, u64)> = blocks.iter().map(|b| (b.block, b.pages)).collect();
        assert_eq!(summary, [(1, 2)]);
        let mut seen = Vec::new();
        for_each_present(&file, 1, 4, |page, pfn| seen.push((page, pfn)))
            .ok()
            .unwrap();
        assert_eq!(seen, [(1, 6), (2, 40_000), (3, 0x8000)]);
        assert!(matches!(
            count_per_block(&file, 4, 2, MIB),
            Err(Counted::Io(_))
        ));

        std::fs::write(&path, PRESENT.to_le_bytes()).unwrap();
        let file = File::open(&path).unwrap();
        assert!(matches!(
            count_per_block(&file, 0, 1, MIB),
            Err(Counted::Hidden)
        ));
    }

    #[test]
    fn errors_name_the_file() {
        let err = pages_per_block(Path::new("/nonexistent"), 4096, 4096, MIB).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        assert!(
            err.to_string().contains("/nonexistent/proc/self/pagemap"),
            "{err}"
        );
    }
}
