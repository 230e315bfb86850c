//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), DSDT, MADT, SRAT and SLIT.
//!
//! The guest finds its NUMA topology here: SRAT gives each vCPU's APIC id and each
//! memory range a proximity domain (our node id), SLIT gives node distances. The DSDT
//! carries `_S5_`, so that the kernel can power off through the FADT sleep register,
//! and the virtio-mmio devices (`LNRO0005`), which the kernel enumerates as platform
//! devices without needing PCI.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::slit::SLIT;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

use crate::layout::{self, MemoryRange};

const OEM_ID: [u8; 6] = *b"MEMPWR";
const OEM_TABLE_ID: [u8; 8] = *b"MEMPOWER";
const OEM_REVISION: u32 = 1;

/// SLIT distances: 10 is local by definition, 20 is the usual one-hop remote value.
pub const LOCAL_DISTANCE: u8 = 10;
pub const REMOTE_DISTANCE: u8 = 20;

/// The FADT sleep-control value for S5 (`SLP_TYP`=5 at bit 2, `SLP_EN` at bit 5), as
/// Linux writes it for the `_S5_` package below.
pub const S5_SLEEP_VALUE: u8 = (5 << 2) | (1 << 5);
/// The FADT reset value, written to the same port.
pub const RESET_VALUE: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables need {needed} bytes but only {room} fit below 1 MiB")]
    TooLarge { needed: usize, room: u64 },
}

/// A virtio-mmio device as the DSDT announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct AcpiConfig<'a> {
    /// `node_of_cpu[i]` is the node of vCPU i (whose APIC id is i).
    pub node_of_cpu: Vec<u32>,
    pub node_count: u32,
    /// Boot memory ranges, each enabled in SRAT for its node.
    pub memory: &'a [MemoryRange],
    /// Hotpluggable ranges (node, base, size), marked hotpluggable in SRAT.
    pub hotplug: &'a [(u32, u64, u64)],
    pub virtio_devices: &'a [VirtioMmioDevice],
}

/// The tables, laid out for `layout::ACPI_START`: write each `(address, bytes)`.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    pub rsdp_addr: u64,
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt(devices: &[VirtioMmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    // Package {SLP_TYPa, SLP_TYPb}: Linux writes SLP_TYPa into the sleep-control register.
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&5u8, &0u8])).to_aml_bytes(&mut body);
    // COM1 must be an ACPI device: hardware-reduced ACPI has no legacy PIC, so Linux maps
    // no ISA IRQs by itself, and only the PNP driver gets the UART its interrupt.
    let com1_io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_res = aml::Name::new("_CRS".into(), &com1_crs);
    aml::Device::new("_SB_.COM1".into(), vec![&com1_hid, &com1_uid, &com1_res])
        .to_aml_bytes(&mut body);
    for (i, dev) in devices.iter().enumerate() {
        let memory = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
        let resources = aml::ResourceTemplate::new(vec![&memory, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_value = i as u32;
        let uid = aml::Name::new("_UID".into(), &uid_value);
        let crs = aml::Name::new("_CRS".into(), &resources);
        let path = format!("_SB_.V{i:03X}");
        aml::Device::new(path.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |addr: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            addr.into(),
        )
    };
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.reset_reg = port(layout::ACPI_PM_PORT);
    builder.reset_value = RESET_VALUE;
    builder.sleep_control_reg = port(layout::ACPI_PM_PORT);
    builder.sleep_status_reg = port(layout::ACPI_PM_PORT);
    to_bytes(&builder.finalize())
}

fn madt(vcpus: usize) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR as u32),
    );
    for cpu in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            cpu as u8,
            cpu as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR as u32, 0));
    to_bytes(&madt)
}

/// SRAT flag bits for memory affinity.
const SRAT_ENABLED: u32 = 1;
const SRAT_HOTPLUGGABLE: u32 = 2;

fn srat(cfg: &AcpiConfig) -> Vec<u8> {
    // acpi_tables' SRAT has no x86 processor-affinity entry, so build this one by hand.
    let mut sdt = Sdt::new(*b"SRAT", 48, 3, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.write_u32(36, 1); // reserved, must be 1
    for (apic_id, &node) in cfg.node_of_cpu.iter().enumerate() {
        let mut entry = [0u8; 16];
        entry[0] = 0; // Processor Local APIC Affinity
        entry[1] = 16;
        entry[2] = node as u8; // proximity domain [7:0]
        entry[3] = apic_id as u8;
        entry[4..8].copy_from_slice(&SRAT_ENABLED.to_le_bytes());
        entry[9..12].copy_from_slice(&node.to_le_bytes()[1..4]); // proximity domain [31:8]
        sdt.append_slice(&entry);
    }
    let mut memory = |node: u32, base: u64, size: u64, flags: u32| {
        let mut entry = [0u8; 40];
        entry[0] = 1; // Memory Affinity
        entry[1] = 40;
        entry[2..6].copy_from_slice(&node.to_le_bytes());
        entry[8..16].copy_from_slice(&base.to_le_bytes());
        entry[16..24].copy_from_slice(&size.to_le_bytes());
        entry[28..32].copy_from_slice(&flags.to_le_bytes());
        sdt.append_slice(&entry);
    };
    for r in cfg.memory {
        memory(r.node, r.guest_addr, r.size, SRAT_ENABLED);
    }
    for &(node, base, size) in cfg.hotplug {
        memory(node, base, size, SRAT_ENABLED | SRAT_HOTPLUGGABLE);
    }
    sdt.as_slice().to_vec()
}

fn slit(nodes: u32) -> Vec<u8> {
    let mut slit = SLIT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION, nodes);
    for a in 0..nodes as usize {
        for b in 0..nodes as usize {
            slit.set_distance(
                a,
                b,
                if a == b {
                    LOCAL_DISTANCE
                } else {
                    REMOTE_DISTANCE
                },
            );
        }
    }
    to_bytes(&slit)
}

fn align8(addr: u64) -> u64 {
    (addr + 7) & !7
}

/// Builds every table and places them from `layout::ACPI_START` upwards.
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let rsdp_addr = layout::ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);
    let mut blobs = Vec::new();
    let mut place = |bytes: Vec<u8>, blobs: &mut Vec<(u64, Vec<u8>)>| {
        let addr = next;
        next = align8(addr + bytes.len() as u64);
        blobs.push((addr, bytes));
        addr
    };
    let dsdt_addr = place(dsdt(cfg.virtio_devices), &mut blobs);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(place(fadt(dsdt_addr), &mut blobs));
    xsdt.add_entry(place(madt(cfg.node_of_cpu.len()), &mut blobs));
    xsdt.add_entry(place(srat(cfg), &mut blobs));
    xsdt.add_entry(place(slit(cfg.node_count), &mut blobs));
    let xsdt_addr = place(to_bytes(&xsdt), &mut blobs);
    blobs.insert(0, (rsdp_addr, to_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    if next > layout::ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: (next - rsdp_addr) as usize,
            room: layout::ACPI_END - rsdp_addr,
        });
    }
    Ok(AcpiTables { rsdp_addr, blobs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;

    const MIB: u64 = 1 << 20;

    fn two_nodes() -> AcpiTables {
        let layout = MemoryLayout::new(&[256 * MIB, 256 * MIB]).unwrap();
        let devices = [VirtioMmioDevice {
            base: layout::VIRTIO_MMIO_BASE,
            size: 0x1000,
            irq: 5,
        }];
        let hotplug = [(1, 1 << 32, 1 << 30)];
        let cfg = AcpiConfig {
            node_of_cpu: vec![0, 0, 1, 1],
            node_count: 2,
            memory: &layout.ranges,
            hotplug: &hotplug,
            virtio_devices: &devices,
        };
        build(&cfg).unwrap()
    }

    fn table<'a>(t: &'a AcpiTables, sig: &[u8; 4]) -> &'a [u8] {
        &t.blobs.iter().find(|(_, b)| &b[0..4] == sig).unwrap().1
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn every_table_has_a_valid_checksum_and_length() {
        let t = two_nodes();
        for (addr, bytes) in &t.blobs[1..] {
            assert_eq!(
                u32_at(bytes, 4) as usize,
                bytes.len(),
                "{:?} length",
                &bytes[0..4]
            );
            assert_eq!(
                sum(bytes),
                0,
                "table {:?} at {addr:#x}",
                std::str::from_utf8(&bytes[0..4])
            );
        }
        let rsdp = &t.blobs[0].1;
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    }

    #[test]
    fn tables_do_not_overlap_and_fit_the_legacy_area() {
        let t = two_nodes();
        let mut spans: Vec<_> = t
            .blobs
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0);
        }
        assert!(spans.last().unwrap().1 <= layout::ACPI_END);
        assert_eq!(t.rsdp_addr, layout::ACPI_START);
    }

    #[test]
    fn xsdt_points_at_every_table() {
        let t = two_nodes();
        let xsdt = table(&t, b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let sigs: Vec<&[u8]> = entries
            .iter()
            .map(|a| &t.blobs.iter().find(|(b, _)| b == a).unwrap().1[0..4])
            .collect();
        assert_eq!(sigs, vec![b"FACP", b"APIC", b"SRAT", b"SLIT"]);
        let rsdp = &t.blobs[0].1;
        assert_eq!(
            u64_at(rsdp, 24),
            t.blobs.iter().find(|(_, b)| &b[0..4] == b"XSDT").unwrap().0
        );
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let t = two_nodes();
        let madt = table(&t, b"APIC");
        assert_eq!(u32_at(madt, 36), layout::LAPIC_ADDR as u32);
        let mut off = 44;
        let mut apic_ids = vec![];
        let mut ioapics = vec![];
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(u32_at(madt, off + 4), 1, "enabled");
                    apic_ids.push(madt[off + 3]);
                }
                1 => ioapics.push(u32_at(madt, off + 4)),
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(apic_ids, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, vec![layout::IOAPIC_ADDR as u32]);
    }

    #[test]
    fn srat_maps_cpus_and_memory_to_nodes() {
        let t = two_nodes();
        let srat = table(&t, b"SRAT");
        assert_eq!(u32_at(srat, 36), 1);
        let (mut cpus, mut mem) = (vec![], vec![]);
        let mut off = 48;
        while off < srat.len() {
            match (srat[off], srat[off + 1]) {
                (0, 16) => cpus.push((srat[off + 3], srat[off + 2], u32_at(srat, off + 4))),
                (1, 40) => mem.push((
                    u32_at(srat, off + 2),
                    u64_at(srat, off + 8),
                    u64_at(srat, off + 16),
                    u32_at(srat, off + 28),
                )),
                other => panic!("unexpected SRAT entry {other:?}"),
            }
            off += srat[off + 1] as usize;
        }
        assert_eq!(cpus, vec![(0, 0, 1), (1, 0, 1), (2, 1, 1), (3, 1, 1)]);
        assert_eq!(
            mem,
            vec![
                (0, 0, 256 * MIB, 1),
                (1, 256 * MIB, 256 * MIB, 1),
                (1, 1 << 32, 1 << 30, 3),
            ]
        );
    }

    #[test]
    fn slit_has_local_and_remote_distances() {
        let t = two_nodes();
        let slit = table(&t, b"SLIT");
        assert_eq!(u64_at(slit, 36), 2);
        assert_eq!(&slit[44..48], &[10, 20, 20, 10]);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let t = two_nodes();
        let fadt = table(&t, b"FACP");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // reset_reg GAS at 116: IO space, port 0x600; reset value at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), layout::ACPI_PM_PORT as u64);
        assert_eq!(fadt[128], RESET_VALUE);
        // X_DSDT at 140 points at the DSDT.
        let dsdt_addr = t.blobs.iter().find(|(_, b)| &b[0..4] == b"DSDT").unwrap().0;
        assert_eq!(u64_at(fadt, 140), dsdt_addr);
        // sleep_control_reg at 244 and sleep_status_reg at 256.
        assert_eq!(u64_at(fadt, 248), layout::ACPI_PM_PORT as u64);
        assert_eq!(u64_at(fadt, 260), layout::ACPI_PM_PORT as u64);
    }

    #[test]
    fn dsdt_announces_s5_and_virtio_mmio_devices() {
        let t = two_nodes();
        let dsdt = table(&t, b"DSDT");
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_"));
        assert!(has(b"COM1"));
        // PNP0501 as a compressed EISA id, and the UART's IO port descriptor.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03]));
        assert!(has(b"LNRO0005"));
        assert!(has(&(layout::VIRTIO_MMIO_BASE as u32).to_le_bytes()));
    }

    #[test]
    fn too_many_tables_are_refused() {
        let ranges: Vec<MemoryRange> = (0..4000)
            .map(|i| MemoryRange {
                node: 0,
                guest_addr: i * MIB,
                size: MIB,
                file_offset: 0,
            })
            .collect();
        let cfg = AcpiConfig {
            node_of_cpu: vec![0],
            node_count: 1,
            memory: &ranges,
            hotplug: &[],
            virtio_devices: &[],
        };
        assert!(matches!(build(&cfg), Err(AcpiError::TooLarge { .. })));
    }
}
