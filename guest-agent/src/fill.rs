//! `fill`, `locate`, `verify`, `release`: anonymous memory bound to one NUMA node, filled
//! with a pattern that can be checked later, and kept until released. The VMM uses fills
//! to put data into memory blocks, evacuate them, and check that nothing was lost.
//!
//! The pattern is a function of the seed and the index of each 8-byte word (splitmix64),
//! so `verify` recomputes it instead of keeping a copy.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use agent_protocol::BlockPages;
use thiserror::Error;

use crate::held::{self, Handles, HeldError, Kind, RESERVE_KIB};
use crate::memory::{self, MemoryError, PAGE_SIZE};
use crate::pagemap::{self, PagemapError};
use crate::sys;

mod interleaved;

pub use interleaved::InterleaveError;

/// Largest single fill (or pair of interleaved fills).
pub const MAX_FILL: u64 = 4 << 30;
const MPOL_BIND: libc::c_int = 2;

#[derive(Debug, Error)]
pub enum FillError {
    #[error(transparent)]
    Held(#[from] HeldError),
    #[error("mmap of {bytes} bytes failed: {source}")]
    Map { bytes: u64, source: io::Error },
    #[error("mbind(MPOL_BIND, node {node}) failed: {source}")]
    Bind { node: u32, source: io::Error },
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

impl FillError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Held(e) => e.errno(),
            Self::Map { source, .. } | Self::Bind { source, .. } => sys::errno_of(source),
            Self::Pagemap(e) => e.errno(),
            Self::Memory(e) => e.errno(),
        }
    }
}

/// The pattern word at `index` of a fill with `seed` (splitmix64 of seed and index).
pub fn pattern_word(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One anonymous mapping; unmapped on drop.
struct Mapping {
    addr: usize,
    /// Mapped length: `bytes` rounded up to pages.
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a new anonymous private mapping at an address of the kernel's choosing;
        // no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr as usize,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value owns; nothing refers to it once
        // the value is dropped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A live fill.
struct Fill {
    map: Mapping,
    bytes: u64,
    seed: u64,
}

impl Fill {
    /// The filled bytes as whole words and the tail (fewer than 8 bytes).
    fn words(&self) -> (&[u64], &[u8]) {
        let words = (self.bytes / 8) as usize;
        let tail = (self.bytes % 8) as usize;
        // SAFETY: the mapping is page-aligned, readable and at least `bytes` long, and it
        // lives as long as `self`. After `fill` has written it nothing writes to it, so
        // shared references are sound.
        unsafe {
            (
                std::slice::from_raw_parts(self.map.addr as *const u64, words),
                std::slice::from_raw_parts((self.map.addr as *const u8).add(words * 8), tail),
            )
        }
    }

    fn write_pattern(map: &mut Mapping, bytes: u64, seed: u64) {
        let words = (bytes / 8) as usize;
        let tail = (bytes % 8) as usize;
        // SAFETY: `map` is a fresh, writable, page-aligned mapping of at least `bytes`
        // bytes, borrowed mutably here, so nothing else can read or write it meanwhile.
        let (body, rest) = unsafe {
            (
                std::slice::from_raw_parts_mut(map.addr as *mut u64, words),
                std::slice::from_raw_parts_mut((map.addr as *mut u8).add(words * 8), tail),
            )
        };
        for (index, word) in body.iter_mut().enumerate() {
            *word = pattern_word(seed, index as u64);
        }
        rest.copy_from_slice(&pattern_word(seed, words as u64).to_le_bytes()[..tail]);
    }

    /// Bytes that differ from the pattern.
    fn mismatched_bytes(&self) -> u64 {
        let (words, tail) = self.words();
        let mut bad = 0u64;
        for (index, &word) in words.iter().enumerate() {
            let diff = word ^ pattern_word(self.seed, index as u64);
            if diff != 0 {
                bad += u64::from(diff.to_le_bytes().iter().filter(|&&b| b != 0).count() as u32);
            }
        }
        let want = pattern_word(self.seed, words.len() as u64).to_le_bytes();
        bad + tail.iter().zip(want).filter(|(a, b)| *a != b).count() as u64
    }
}

/// What `fill` and `locate` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub handle: u64,
    pub blocks: Vec<BlockPages>,
}

#[derive(Default)]
struct Table {
    fills: HashMap<u64, Arc<Fill>>,
}

/// The fills alive in this agent, by handle (handles start at 1 and are never reused).
#[derive(Default)]
pub struct Fills {
    table: Mutex<Table>,
    handles: Arc<Handles>,
}

impl Fills {
    /// Fills whose handles come from `handles`, which other stores may share.
    pub fn new(handles: Arc<Handles>) -> Self {
        Self {
            table: Mutex::default(),
            handles,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, handle: u64) -> Result<Arc<Fill>, FillError> {
        self.lock()
            .fills
            .get(&handle)
            .cloned()
            .ok_or(unknown(handle))
    }

    /// Maps `bytes` bound to `node`, writes the pattern of `seed` into every byte and
    /// keeps it; `root` is where procfs and sysfs are found.
    pub fn fill(
        &self,
        root: &Path,
        node: u32,
        bytes: u64,
        seed: u64,
    ) -> Result<Placement, FillError> {
        if bytes == 0 || bytes > MAX_FILL {
            return Err(bad_size(bytes));
        }
        check_room(root, node, bytes)?;
        let block_size = memory::block_size(root)?;
        let len = bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        // `len` is at most MAX_FILL, which fits a 64-bit usize.
        let mut map =
            Mapping::new(len as usize).map_err(|source| FillError::Map { bytes, source })?;
        bind(&map, node).map_err(|source| FillError::Bind { node, source })?;
        Fill::write_pattern(&mut map, bytes, seed);
        let blocks = pagemap::pages_per_block(root, map.addr, map.len, block_size)?;
        let handle = self.handles.next();
        self.lock()
            .fills
            .insert(handle, Arc::new(Fill { map, bytes, seed }));
        Ok(Placement { handle, blocks })
    }

    /// The pages of a fill per memory block, now.
    pub fn locate(&self, root: &Path, handle: u64) -> Result<Placement, FillError> {
        let fill = self.get(handle)?;
        let block_size = memory::block_size(root)?;
        let blocks = pagemap::pages_per_block(root, fill.map.addr, fill.map.len, block_size)?;
        Ok(Placement { handle, blocks })
    }

    /// Checked and mismatched bytes of a fill.
    pub fn verify(&self, handle: u64) -> Result<(u64, u64), FillError> {
        let fill = self.get(handle)?;
        Ok((fill.bytes, fill.mismatched_bytes()))
    }

    /// Forgets a fill; its memory is unmapped once no `verify` or `locate` uses it.
    pub fn release(&self, handle: u64) -> Result<(), FillError> {
        self.lock()
            .fills
            .remove(&handle)
            .map(drop)
            .ok_or(unknown(handle))
    }
}

fn bad_size(bytes: u64) -> FillError {
    FillError::Held(HeldError::BadSize {
        kind: Kind::Fill,
        bytes,
        max: MAX_FILL,
    })
}

/// Fails unless `node` has room for `bytes` more and the reserve.
fn check_room(root: &Path, node: u32, bytes: u64) -> Result<(), FillError> {
    let free_kib = held::node_free_kib(root, node)?;
    if bytes.div_ceil(1024) + RESERVE_KIB > free_kib {
        return Err(HeldError::NotEnoughMemory {
            kind: Kind::Fill,
            node,
            bytes,
            free_kib,
            where_: "",
        }
        .into());
    }
    Ok(())
}

fn unknown(handle: u64) -> FillError {
    FillError::Held(HeldError::UnknownHandle {
        kind: Kind::Fill,
        handle,
    })
}

fn bind(map: &Mapping, node: u32) -> io::Result<()> {
    let mask: u64 = 1 << node;
    // maxnode is one more than the bits in the mask: the kernel reads maxnode - 1 bits,
    // so 65 makes all 64 bits of `mask` count and reads exactly this one u64.
    // SAFETY: mbind reads one u64 from `mask`, which lives across the call; it changes
    // the policy of our own mapping only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            map.addr,
            map.len,
            MPOL_BIND,
            &raw const mask,
            65usize,
            0u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::tests::Fixture;

    const MIB: u64 = 1 << 20;

    fn root() -> &'static Path {
        Path::new("/")
    }

    #[test]
    fn pattern_depends_on_seed_and_index() {
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
        assert_ne!(pattern_word(1, 0), pattern_word(1, 1));
        assert_eq!(pattern_word(7, 12345), pattern_word(7, 12345));
    }

    #[test]
    fn fill_locate_verify_release_on_node_0() {
        let fills = Fills::default();
        let placed = fills.fill(root(), 0, 4 * MIB, 42).unwrap();
        assert_eq!(placed.handle, 1);
        let pages: u64 = placed.blocks.iter().map(|b| b.pages).sum();
        assert_eq!(pages, 1024, "{:?}", placed.blocks);
        for b in &placed.blocks {
            let dir = memory::memory_dir(root()).join(format!("memory{}", b.block));
            assert!(dir.is_dir(), "block {} does not exist", b.block);
        }
        assert_eq!(fills.locate(root(), 1).unwrap().blocks, placed.blocks);
        assert_eq!(fills.verify(1).unwrap(), (4 * MIB, 0));

        let second = fills.fill(root(), 0, 4097, 43).unwrap();
        assert_eq!(second.handle, 2);
        assert_eq!(second.blocks.iter().map(|b| b.pages).sum::<u64>(), 2);
        assert_eq!(fills.verify(2).unwrap(), (4097, 0));

        fills.release(1).unwrap();
        for handle in [1, 99] {
            assert_eq!(fills.verify(handle).unwrap_err().errno(), libc::EINVAL);
            assert_eq!(
                fills.locate(root(), handle).unwrap_err().errno(),
                libc::EINVAL
            );
            assert!(fills
                .release(handle)
                .unwrap_err()
                .to_string()
                .contains("no such fill handle"));
        }
        let third = fills.fill(root(), 0, 8192, 1).unwrap();
        assert_eq!(third.handle, 3, "handles are not reused");
    }

    #[test]
    fn verify_detects_corruption() {
        let fills = Fills::default();
        let handle = fills.fill(root(), 0, 4 * MIB + 5, 9).unwrap().handle;
        let fill = fills.get(handle).unwrap();
        let base = fill.map.addr as *mut u8;
        for offset in [0, 1, 2 * MIB as usize + 3, 4 * MIB as usize + 4] {
            // SAFETY: `offset` is below the fill's 4 MiB + 5 bytes, inside its mapping,
            // which `fill` keeps alive; nothing else reads or writes it meanwhile.
            unsafe {
                let byte = base.add(offset);
                byte.write_volatile(!byte.read_volatile());
            }
        }
        assert_eq!(fills.verify(handle).unwrap(), (4 * MIB + 5, 4));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let fills = Fills::default();
        for bytes in [0, MAX_FILL + 1] {
            let err = fills.fill(root(), 0, bytes, 1).unwrap_err();
            assert_eq!(err.errno(), libc::EINVAL, "{err}");
        }
        for node in [64, 4095] {
            let err = fills.fill(root(), node, MIB, 1).unwrap_err();
            assert_eq!(err.errno(), libc::ENOENT, "{err}");
        }
        let fx = Fixture::new("fill-nodes");
        fx.node(0, "0", 1024).node(1, "1", 1024);
        let err = fills.fill(&fx.0, 2, MIB, 1).unwrap_err();
        assert_eq!(err.errno(), libc::ENOENT, "{err}");
        let err = fills.fill(&fx.0, 1, MIB, 1).unwrap_err();
        assert_eq!(err.errno(), libc::ENOMEM, "{err}");
        assert!(err.to_string().contains("1234 KiB free"), "{err}");
    }

    #[test]
    fn mbind_failure_is_reported_with_errno() {
        // A node that exists in the fixture but not in the kernel: mbind says EINVAL.
        let fx = Fixture::new("fill-bind");
        fx.node(0, "0", 1024).node(63, "", 1024).file(
            "sys/devices/system/node/node63/meminfo",
            "Node 63 MemFree: 99999999 kB\n",
        );
        fx.file("sys/devices/system/memory/block_size_bytes", "8000000\n");
        let err = Fills::default().fill(&fx.0, 63, MIB, 1).unwrap_err();
        assert!(matches!(err, FillError::Bind { node: 63, .. }), "{err}");
        assert_eq!(err.errno(), libc::EINVAL);
    }
}
