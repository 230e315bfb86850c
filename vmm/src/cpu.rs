//! vCPU setup for a 64-bit Linux entry, and the vCPU run loop.
//!
//! Only the boot processor gets long-mode registers that matter: with the in-kernel
//! LAPIC, KVM keeps the others waiting for INIT/SIPI, which the guest kernel sends.

use std::sync::Arc;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::boot::GDT;
use crate::devices::{Bus, ExitReason, VmExit};
use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("vCPU {cpu}: {what} failed: {source}")]
    Kvm {
        cpu: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {cpu}: the host set only {set} of {wanted} boot MSRs")]
    Msrs { cpu: u32, set: usize, wanted: usize },
}

fn kvm_err(cpu: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { cpu, what, source }
}

/// CPUID as KVM supports it, with each vCPU's APIC id and a flat topology: every vCPU
/// is a package of one core with its own caches. NUMA nodes then never split a package
/// or a shared cache, which Linux's scheduler topology checks would flag.
pub fn cpuid_for(base: &CpuId, cpu: u32, node: u32) -> CpuId {
    let mut cpuid = base.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (cpu << 24) | (1 << 16);
                entry.ecx |= 1 << 31; // running on a hypervisor
                entry.edx &= !(1 << 28); // no HTT: one logical processor per package
            }
            // Intel and AMD deterministic cache parameters: no cache is shared, and
            // (Intel) one core per package.
            4 => entry.eax &= 0x0000_3fff,
            0x8000_001d => entry.eax &= !(0xfff << 14),
            0xb | 0x1f => {
                entry.edx = cpu;
                let level_type = match entry.index {
                    0 => 1, // SMT
                    1 => 2, // core
                    _ => 0, // invalid: ends the enumeration
                };
                entry.eax = 0;
                entry.ebx = u32::from(level_type != 0);
                entry.ecx = (level_type << 8) | entry.index;
            }
            0x8000_0008 => entry.ecx &= !0xf0ff, // one core per package (NC and ApicIdSize)
            0x8000_001e => {
                entry.eax = cpu; // extended APIC id
                entry.ebx = 0; // core 0, one thread per core
                entry.ecx = node & 0xff; // node id, one node per package
            }
            _ => {}
        }
    }
    cpuid
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Boot MSRs, as Firecracker sets them: fast strings on, MTRRs enabled with write-back default.
const BOOT_MSRS: [(u32, u64); 10] = [
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast string
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

/// Puts a vCPU in the state Linux's 64-bit entry expects.
pub fn configure(vcpu: &VcpuFd, cpu: u32, cpuid: &CpuId, entry: u64) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(kvm_err(cpu, "KVM_SET_CPUID2"))?;

    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).expect("BOOT_MSRS is far below the FAM limit");
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err(cpu, "KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            cpu,
            set,
            wanted: entries.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err(cpu, "KVM_SET_FPU"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err(cpu, "KVM_GET_SREGS"))?;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = layout::BOOT_GDT;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = tss;
    sregs.cr3 = layout::PML4;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err(cpu, "KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: layout::ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err(cpu, "KVM_SET_REGS"))?;

    // LINT0 delivers ExtINT (the legacy PIC), LINT1 delivers NMI.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err(cpu, "KVM_GET_LAPIC"))?;
    for (offset, mode) in [(0x350usize, 7u32), (0x360, 4)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(cpu, "KVM_SET_LAPIC"))?;
    Ok(())
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Whether a guest-physical address is hotplug memory the guest has not plugged
/// (`SlotTable::unplugged`): an access there is the guest's fault.
pub type Unplugged = Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Reads 8 bytes of guest memory at a guest-physical address, if the devices' view has
/// it: for the page walk that explains an internal error ([`walk`]).
pub type ReadGuest = Arc<dyn Fn(u64) -> Option<u64> + Send + Sync>;

/// Runs a vCPU until the VM exits; device accesses go to the buses.
pub fn run(
    cpu: u32,
    mut vcpu: VcpuFd,
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<VmExit>,
    unplugged: Unplugged,
    read: ReadGuest,
) {
    let reason = loop {
        if exit.is_set() {
            return;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => io.read(u64::from(port), data),
            Ok(VcpuExit::IoOut(port, data)) => io.write(u64::from(port), data),
            Ok(VcpuExit::MmioRead(addr, data)) => mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
            Ok(VcpuExit::Shutdown) => {
                break ExitReason::Reset(format!("triple fault or shutdown: {}", state(cpu, &vcpu)))
            }
            Ok(VcpuExit::Hlt) => break ExitReason::Reset("vCPU halted with interrupts off".into()),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                break if kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                    ExitReason::PowerOff
                } else {
                    ExitReason::Reset(format!("system event {kind}"))
                }
            }
            // KVM found no page behind the access: a closed (unplugged) block of a present
            // region. With KVM_CAP_MEMORY_FAULT_INFO (Linux 6.8) KVM says where.
            Ok(VcpuExit::MemoryFault { gpa, size, .. }) => {
                let why = format!("vCPU {cpu}: {size} bytes at guest-physical {gpa:#x}");
                break match unplugged(gpa) {
                    true => ExitReason::GuestFault(format!(
                        "{why} were accessed, but the guest unplugged them"
                    )),
                    false => ExitReason::Error(format!("{why}: KVM found no host memory")),
                };
            }
            Err(e) if e.errno() == libc::EFAULT => {
                break ExitReason::GuestFault(format!(
                    "vCPU {cpu}: the guest accessed memory the host does not back (KVM_RUN: \
                     EFAULT; this host's KVM does not say where), such as a block it \
                     unplugged: {}",
                    state(cpu, &vcpu)
                ))
            }
            // An instruction fetch from a removed region (no slot), or a page walk through
            // one, cannot be emulated.
            Ok(VcpuExit::InternalError) => break internal_error(cpu, &vcpu, &*unplugged, &*read),
            Ok(VcpuExit::FailEntry(reason, _)) => {
                break ExitReason::Error(format!(
                    "vCPU {cpu}: VM entry failed (hardware reason {reason:#x})"
                ))
            }
            Ok(other) => break ExitReason::Error(format!("vCPU {cpu}: unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break ExitReason::Error(format!("vCPU {cpu}: KVM_RUN failed: {e}")),
        }
    };
    exit.set(reason);
}

/// A KVM internal error: the guest's fault if it ran code from memory it unplugged, or
/// if the walk of its page tables for that code goes through memory it unplugged.
fn internal_error(
    cpu: u32,
    vcpu: &VcpuFd,
    unplugged: &dyn Fn(u64) -> bool,
    read: &dyn Fn(u64) -> Option<u64>,
) -> ExitReason {
    let walked = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => walk::walk(s.cr3, s.cr4, s.efer, r.rip, read, unplugged),
        _ => walk::Walk::NotLongMode,
    };
    // Outside long mode, KVM's own translation.
    let gpa = match walked {
        walk::Walk::Mapped(gpa) => Some(gpa),
        walk::Walk::NotLongMode => vcpu
            .get_regs()
            .ok()
            .and_then(|r| vcpu.translate_gva(r.rip).ok())
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address),
        _ => None,
    };
    match (walked, gpa) {
        (walk::Walk::Unplugged { entry }, _) => ExitReason::GuestFault(format!(
            "vCPU {cpu}: the guest's page tables for its next instruction need the entry at \
             guest-physical {entry:#x}, in memory it unplugged: {}",
            state(cpu, vcpu)
        )),
        (_, Some(gpa)) if unplugged(gpa) => ExitReason::GuestFault(format!(
            "vCPU {cpu}: the guest ran code at guest-physical {gpa:#x}, in memory it unplugged"
        )),
        _ => ExitReason::Error(format!(
            "vCPU {cpu}: KVM internal error: {}",
            state(cpu, vcpu)
        )),
    }
}

/// The registers that explain an unexpected stop, for the exit message.
fn state(cpu: u32, vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "vCPU {cpu} rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        ),
        _ => format!("vCPU {cpu}, registers unavailable"),
    }
}

/// The CPUID KVM offers, fetched once.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(0, "KVM_GET_SUPPORTED_CPUID"))
}

pub mod walk;

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn long_mode_code_segment() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (16, 0, 1, 3));
        let null = segment_from_gdt(GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn cpuid_gives_each_vcpu_its_own_package_and_caches() {
        let entry = |function, index, eax, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ecx,
            edx,
            ..Default::default()
        };
        let base = CpuId::from_entries(&[
            entry(1, 0, 0, 0, 1 << 28),
            entry(4, 0, 0xfc00_4121, 0, 0),
            entry(0xb, 0, 1, 0x100, 0),
            entry(0xb, 1, 4, 0x201, 0),
            entry(0xb, 2, 0, 2, 0),
            entry(0x8000_0008, 0, 0, 0x7007, 0),
            entry(0x8000_001d, 0, 0x0003_c163, 0, 0),
            entry(0x8000_001e, 0, 0, 0, 0),
        ])
        .unwrap();
        let c = cpuid_for(&base, 3, 1);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3, "initial APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 1);
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(e[0].edx & (1 << 28), 0, "no HTT");
        assert_eq!(e[1].eax, 0x121, "leaf 4: no sharing, one core");
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (0, 1, 0x100, 3));
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx, e[3].edx), (0, 1, 0x201, 3));
        assert_eq!((e[4].eax, e[4].ebx, e[4].ecx), (0, 0, 2));
        assert_eq!(
            e[5].ecx, 0,
            "one core per package: NC and ApicIdSize cleared"
        );
        assert_eq!(e[6].eax, 0x163, "L1 not shared");
        assert_eq!(
            (e[7].eax, e[7].ebx, e[7].ecx),
            (3, 0, 1),
            "AMD APIC id and node"
        );
    }
}
