//! `block_usage`: how many pages of a memory block are free, i.e. held by the buddy
//! allocator.
//!
//! The source is /proc/kpageflags (one u64 of flags per PFN), bit `KPF_BUDDY`, which the
//! kernel sets on every page of a free buddy chunk, not only on its first page. It is
//! not /proc/kpagecount: that counts how often a page is *mapped* into user space, so
//! slab, page tables, page cache and every other kernel allocation read as 0 there,
//! which would make busy blocks look free.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use agent_protocol::BlockUsage;
use thiserror::Error;

use crate::memory::{self, MemoryError, PAGE_SIZE};

/// Set on every page of a free buddy chunk (include/uapi/linux/kernel-page-flags.h).
pub const KPF_BUDDY: u32 = 10;
/// Bytes of kpageflags read at once: 8192 pages, 32 MiB of memory.
const CHUNK: usize = 64 << 10;

#[derive(Debug, Error)]
pub enum UsageError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl UsageError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Memory(e) => e.errno(),
            Self::Read { source, .. } => crate::sys::errno_of(source),
        }
    }
}

/// Usage of `blocks` (every online block if empty), in the order asked. Offline blocks
/// report all their pages and no free ones; kpageflags is not read for them.
pub fn block_usage(root: &Path, blocks: &[u32]) -> Result<Vec<BlockUsage>, UsageError> {
    let block_size = memory::block_size(root)?;
    let wanted = if blocks.is_empty() {
        let mut online = Vec::new();
        for id in memory::block_ids(root)? {
            if memory::read_state(root, id)? == "online" {
                online.push(id);
            }
        }
        online
    } else {
        memory::check_blocks_exist(root, blocks)?;
        blocks.to_vec()
    };
    let pages = block_size / PAGE_SIZE;
    let path = root.join("proc/kpageflags");
    let mut flags: Option<File> = None;
    let mut usage = Vec::with_capacity(wanted.len());
    for block in wanted {
        let free_pages = if memory::read_state(root, block)? == "online" {
            let file = match &flags {
                Some(file) => file,
                None => flags.insert(File::open(&path).map_err(|source| UsageError::Read {
                    path: path.clone(),
                    source,
                })?),
            };
            let first_pfn = u64::from(block).saturating_mul(pages);
            count_flag(file, first_pfn, pages, KPF_BUDDY).map_err(|source| UsageError::Read {
                path: path.clone(),
                source,
            })?
        } else {
            0
        };
        usage.push(BlockUsage {
            block,
            pages,
            free_pages,
            node: memory::block_node(root, block)?,
        });
    }
    Ok(usage)
}

/// Counts the PFNs in `first_pfn..first_pfn + pages` whose u64 entry in `file` (a
/// kpageflags-like array) has bit `bit` set, reading [`CHUNK`] bytes at a time. Entries
/// past the end of the file (PFNs above the kernel's max_pfn) count as not set.
pub fn count_flag(file: &File, first_pfn: u64, pages: u64, bit: u32) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut count = 0;
    let mut pfn = first_pfn;
    let end = first_pfn.saturating_add(pages);
    while pfn < end {
        let want = usize::try_from((end - pfn).saturating_mul(8))
            .unwrap_or(CHUNK)
            .min(CHUNK);
        let offset = pfn.checked_mul(8).ok_or(io::ErrorKind::InvalidInput)?;
        let got = read_full_at(file, &mut buf[..want], offset)?;
        count += buf[..got - got % 8]
            .chunks_exact(8)
            .filter(|entry| {
                let value = u64::from_le_bytes([
                    entry[0], entry[1], entry[2], entry[3], entry[4], entry[5], entry[6], entry[7],
                ]);
                value & (1 << bit) != 0
            })
            .count() as u64;
        if got < want {
            break; // end of file
        }
        pfn += (want / 8) as u64;
    }
    Ok(count)
}

/// pread until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::two_node_fixture;
    use crate::numa::tests::Fixture;

    const BUDDY: u64 = 1 << KPF_BUDDY;

    /// Writes a kpageflags fixture of `pfns` entries where `free(pfn)` decides BUDDY;
    /// other bits are set too, to check that only BUDDY counts.
    fn kpageflags(fx: &Fixture, pfns: u64, free: impl Fn(u64) -> bool) {
        let mut bytes = Vec::with_capacity(pfns as usize * 8);
        for pfn in 0..pfns {
            let flags = if free(pfn) { BUDDY } else { 1 << 5 | 1 << 11 };
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        let path = fx.0.join("proc/kpageflags");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn counts_a_range_across_chunks() {
        let fx = Fixture::new("usage-count");
        kpageflags(&fx, 40_000, |pfn| pfn % 3 == 0);
        let file = File::open(fx.0.join("proc/kpageflags")).unwrap();
        assert_eq!(count_flag(&file, 0, 30_000, KPF_BUDDY).unwrap(), 10_000);
        assert_eq!(count_flag(&file, 1, 2, KPF_BUDDY).unwrap(), 0);
        assert_eq!(count_flag(&file, 3, 1, KPF_BUDDY).unwrap(), 1);
        assert_eq!(count_flag(&file, 0, 30_000, 5).unwrap(), 20_000);
        // Past the end of the file nothing counts.
        assert_eq!(count_flag(&file, 39_999, 10, KPF_BUDDY).unwrap(), 1);
        assert_eq!(count_flag(&file, 50_000, 10, KPF_BUDDY).unwrap(), 0);
        assert_eq!(
            count_flag(&file, u64::MAX - 1, 10, KPF_BUDDY)
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn usage_of_online_and_offline_blocks() {
        let fx = two_node_fixture("usage-blocks");
        // 8 pages per block. Blocks 0, 1 and 8 are online; 9 and 10 are offline, so
        // their (all BUDDY) entries must not count.
        fx.file("sys/devices/system/memory/block_size_bytes", "8000\n");
        kpageflags(&fx, 11 * 8, |pfn| match pfn / 8 {
            0 => pfn % 8 < 2,
            1 => false,
            _ => true,
        });
        let all = block_usage(&fx.0, &[]).unwrap();
        let summary: Vec<(u32, u64, u64)> = all
            .iter()
            .map(|u| (u.block, u.pages, u.free_pages))
            .collect();
        assert_eq!(summary, [(0, 8, 2), (1, 8, 0), (8, 8, 8)]);

        let some = block_usage(&fx.0, &[9, 8]).unwrap();
        assert_eq!(
            some,
            [
                BlockUsage {
                    block: 9,
                    pages: 8,
                    free_pages: 0,
                    node: Some(1),
                },
                BlockUsage {
                    block: 8,
                    pages: 8,
                    free_pages: 8,
                    node: Some(1),
                },
            ]
        );
        let err = block_usage(&fx.0, &[8, 5]).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
    }

    #[test]
    fn offline_blocks_do_not_need_kpageflags() {
        let fx = two_node_fixture("usage-no-file");
        let usage = block_usage(&fx.0, &[9, 10]).unwrap();
        assert!(usage.iter().all(|u| u.pages == 32_768 && u.free_pages == 0));
        let err = block_usage(&fx.0, &[8]).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT);
        assert!(err.to_string().contains("kpageflags"), "{err}");
    }
}
