//! `touch <node> <MiB>`: writes that much anonymous memory, preferring one NUMA node, then
//! frees it. Afterwards the pages are resident on the host but free in the guest: exactly
//! the memory that mempower can give back. Tests use it to make a node's hotplugged
//! memory host-resident.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum TouchError {
    #[error("set_mempolicy(MPOL_PREFERRED, node {node}) failed: {source}")]
    Policy { node: u32, source: io::Error },
    #[error("mmap of {mib} MiB failed: {source}")]
    Map { mib: u64, source: io::Error },
    #[error("node {0} is out of range (at most 63)")]
    BadNode(u32),
    #[error("{0} MiB is more than this agent touches at once (4096 MiB)")]
    TooMuch(u64),
}

const MPOL_DEFAULT: libc::c_int = 0;
const MPOL_PREFERRED: libc::c_int = 1;
const PAGE: usize = 4096;
const MAX_MIB: u64 = 4096;

fn set_policy(mode: libc::c_int, mask: u64) -> io::Result<()> {
    let maxnode: libc::c_ulong = if mode == MPOL_DEFAULT { 0 } else { 64 };
    let mask_ptr = if mode == MPOL_DEFAULT {
        std::ptr::null()
    } else {
        &raw const mask
    };
    // SAFETY: set_mempolicy reads `maxnode` bits from `mask_ptr`, which points at a live
    // u64 (64 bits) or is null for MPOL_DEFAULT.
    let rc = unsafe { libc::syscall(libc::SYS_set_mempolicy, mode, mask_ptr, maxnode) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Touches `mib` MiB preferring `node`, frees it, and restores the default policy.
/// Runs on the calling thread, whose memory policy it changes for the duration.
pub fn touch(node: u32, mib: u64) -> Result<(), TouchError> {
    if node >= 64 {
        return Err(TouchError::BadNode(node));
    }
    if mib > MAX_MIB {
        return Err(TouchError::TooMuch(mib));
    }
    set_policy(MPOL_PREFERRED, 1u64 << node)
        .map_err(|source| TouchError::Policy { node, source })?;
    let len = (mib as usize) << 20;
    let result = if len == 0 {
        Ok(())
    } else {
        touch_and_free(len).map_err(|source| TouchError::Map { mib, source })
    };
    let _ = set_policy(MPOL_DEFAULT, 0);
    result
}

fn touch_and_free(len: usize) -> io::Result<()> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing; no
    // existing memory is affected.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = addr.cast::<u8>();
    for offset in (0..len).step_by(PAGE) {
        // SAFETY: `offset < len`, inside the mapping created above, which is writable.
        unsafe { base.add(offset).write_volatile(0xa5) };
    }
    // SAFETY: unmaps exactly the mapping created above; nothing refers to it any more.
    unsafe { libc::munmap(addr, len) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_and_frees_on_node_0() {
        // Every Linux machine has node 0; the policy syscall works without NUMA too.
        touch(0, 4).unwrap();
        touch(0, 0).unwrap();
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(matches!(touch(64, 1), Err(TouchError::BadNode(64))));
        assert!(matches!(touch(0, MAX_MIB + 1), Err(TouchError::TooMuch(_))));
    }
}
