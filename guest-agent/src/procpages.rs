//! Which process pages are in given physical ranges: every process's mappings
//! (`/proc/<pid>/smaps`, only those with resident pages) and their page frame numbers
//! (`/proc/<pid>/pagemap`). `track` uses it to follow pages that offlining migrates.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::memory::PAGE_SIZE;
use crate::pagemap::{self, PagemapError};

/// Pages one scan records at most: 16 GiB of 4 KiB pages, so that a scan's memory
/// (24 bytes a page) stays bounded whatever the guest holds.
pub const MAX_PAGES: usize = 4 << 20;

#[derive(Debug, Error)]
pub enum ScanError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    #[error("more than {MAX_PAGES} mapped pages in the blocks")]
    TooMany,
}

impl ScanError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Read { source, .. } => crate::sys::errno_of(source),
            Self::Pagemap(e) => e.errno(),
            Self::TooMany => libc::E2BIG,
        }
    }
}

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Process {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`, clock ticks since boot.
    pub start_time: u64,
}

/// One mapped page: the process, its virtual page number, and the frame it was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedPage {
    pub process: Process,
    pub page: u64,
    pub pfn: u64,
}

/// Every page that some process maps and whose frame is in one of `ranges` (PFNs), each
/// frame once (a page several processes map is recorded for the first one found).
/// Processes that exit during the scan are skipped.
pub fn mapped_pages_in(root: &Path, ranges: &[Range<u64>]) -> Result<Vec<MappedPage>, ScanError> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for pid in pids(root)? {
        match scan_process(root, pid, ranges, &mut seen, &mut found) {
            Ok(()) => {}
            Err(e) if vanished(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// An error that means the process exited meanwhile, or that this agent may not look
/// into it (its pages then count as not mapped). A pagemap that ends early is one whose
/// process let go of its memory while it was read (it is exiting).
fn vanished(e: &ScanError) -> bool {
    let ended_early = match e {
        ScanError::Read { source, .. } | ScanError::Pagemap(PagemapError::Read { source, .. }) => {
            source.kind() == io::ErrorKind::UnexpectedEof
        }
        _ => false,
    };
    ended_early
        || matches!(
            e.errno(),
            libc::ENOENT | libc::ESRCH | libc::EACCES | libc::EPERM
        )
}

/// The pids below `<root>/proc`, sorted.
fn pids(root: &Path) -> Result<Vec<u32>, ScanError> {
    let dir = root.join("proc");
    let read_err = |source| ScanError::Read {
        path: dir.clone(),
        source,
    };
    let mut pids = Vec::new();
    for entry in fs::read_dir(&dir).map_err(read_err)? {
        let name = entry.map_err(read_err)?.file_name();
        if let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

fn read(path: PathBuf) -> Result<String, ScanError> {
    fs::read_to_string(&path).map_err(|source| ScanError::Read { path, source })
}

/// The process now behind `pid`, or None if it exited.
pub fn process(root: &Path, pid: u32) -> Option<Process> {
    let stat = fs::read_to_string(root.join(format!("proc/{pid}/stat"))).ok()?;
    Some(Process {
        pid,
        start_time: parse_start_time(&stat)?,
    })
}

/// Field 22 of a stat line. The command (field 2) may hold spaces and parentheses, so
/// fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow; the start time is the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn scan_process(
    root: &Path,
    pid: u32,
    ranges: &[Range<u64>],
    seen: &mut HashSet<u64>,
    found: &mut Vec<MappedPage>,
) -> Result<(), ScanError> {
    let Some(process) = process(root, pid) else {
        return Ok(());
    };
    let smaps = read(root.join(format!("proc/{pid}/smaps")))?;
    let vmas = resident_vmas(&smaps);
    if vmas.is_empty() {
        return Ok(()); // a kernel thread, or nothing resident
    }
    let path = root.join(format!("proc/{pid}/pagemap"));
    let file = pagemap::open(&path)?;
    let mut too_many = false;
    for vma in vmas {
        let first = vma.start / PAGE_SIZE;
        let pages = (vma.end - vma.start) / PAGE_SIZE;
        pagemap::for_each_present(&file, first, pages, |page, pfn| {
            if ranges.iter().any(|r| r.contains(&pfn)) && seen.insert(pfn) {
                if found.len() >= MAX_PAGES {
                    too_many = true;
                    return;
                }
                found.push(MappedPage { process, page, pfn });
            }
        })
        .map_err(|e| e.with_path(path.clone()))?;
        if too_many {
            return Err(ScanError::TooMany);
        }
    }
    Ok(())
}

/// A mapping with resident pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vma {
    start: u64,
    end: u64,
}

/// The mappings of an smaps text whose `Rss` is not 0. Header lines are
/// `start-end perms offset dev inode [path]` in hex; malformed lines are skipped.
fn resident_vmas(smaps: &str) -> Vec<Vma> {
    let mut vmas = Vec::new();
    let mut current: Option<Vma> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            continue;
        };
        if first == "Rss:" {
            let rss_kib = words.next().and_then(|w| w.parse::<u64>().ok());
            if let (Some(vma), Some(rss)) = (current.take(), rss_kib) {
                if rss > 0 {
                    vmas.push(vma);
                }
            }
        } else if let Some(vma) = parse_vma_header(first) {
            current = Some(vma);
        }
    }
    vmas
}

fn parse_vma_header(range: &str) -> Option<Vma> {
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    (start < end && start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0).then_some(Vma { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pagemap_that_ends_early_is_a_process_that_went_away() {
        let read = |source: io::Error| {
            ScanError::Pagemap(PagemapError::Read {
                path: "/proc/1/pagemap".into(),
                source,
            })
        };
        assert!(vanished(&read(io::ErrorKind::UnexpectedEof.into())));
        assert!(vanished(&read(io::Error::from_raw_os_error(libc::ESRCH))));
        assert!(!vanished(&read(io::ErrorKind::InvalidData.into())));
        assert!(!vanished(&ScanError::TooMany));
    }

    #[test]
    fn start_time_counts_fields_after_the_command() {
        let stat = "1 (guest agent) S 0 1 1 0 -1 4194560 5 0 0 0 1 2 0 0 20 0 3 0 42 1 2 3";
        assert_eq!(parse_start_time(stat), Some(42));
        let odd = "7 (a) b) (c) R 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0";
        assert_eq!(parse_start_time(odd), Some(99));
        assert_eq!(parse_start_time("7 (short) R 1"), None);
        assert_eq!(parse_start_time("no parenthesis 1 2 3"), None);
    }

    #[test]
    fn only_resident_mappings_count() {
        let smaps = "\
00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/dbus-daemon
Size:                328 kB
Rss:                 200 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                   0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0 [heap]
Rss:                  4 kB
zzzz-7f0000400000 rw-p 00000000 00:00 0
Rss:                  4 kB
7f0000500000-7f0000400000 rw-p 00000000 00:00 0
Rss:                  4 kB
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
Rss:                   0 kB
";
        assert_eq!(
            resident_vmas(smaps),
            [
                Vma {
                    start: 0x40_0000,
                    end: 0x45_2000
                },
                Vma {
                    start: 0x7f00_0020_0000,
                    end: 0x7f00_0030_0000
                },
            ]
        );
        assert!(resident_vmas("").is_empty());
        assert!(resident_vmas("Rss: 5 kB\n").is_empty());
    }

    /// Ignored by default, as pagemap hides frame numbers from others than root; CI
    /// runs it (`.ci/run`).
    #[test]
    #[ignore = "needs root, for the frame numbers in pagemap; run with --ignored pagemap"]
    fn finds_this_process_pages_through_pagemap() {
        // Touch a page, find its frame through our own pagemap, then scan for it.
        let mut page = vec![0u8; PAGE_SIZE as usize * 2];
        page.iter_mut().for_each(|b| *b = 1);
        let addr = page.as_ptr() as u64;
        let vpn = addr.div_ceil(PAGE_SIZE);
        let file = pagemap::open(Path::new("/proc/self/pagemap")).unwrap();
        let mut pfn = None;
        let read = pagemap::for_each_present(&file, vpn, 1, |_, p| pfn = Some(p));
        read.expect("this test needs root: pagemap hides frame numbers from others");
        let pfn = pfn.expect("the page is present");
        let ranges = vec![pfn..pfn + 1, 0..0];
        let found = mapped_pages_in(Path::new("/"), &ranges).unwrap();
        let me = std::process::id();
        assert!(
            found
                .iter()
                .any(|m| m.process.pid == me && m.page == vpn && m.pfn == pfn),
            "{found:?}"
        );
        assert_eq!(found.len(), 1, "each frame once");
        assert_eq!(process(Path::new("/"), me).unwrap().pid, me);
        drop(page);
    }
}
