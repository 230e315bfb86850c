//! Boots a guest with two NUMA nodes and checks the topology the guest agent reports.

use std::time::Instant;

use libtest_mimic::Failed;
use mempower_tests::{print_phase, GuestBuilder};

const NODE_MIB: u64 = 256;
const NODE_KIB: u64 = NODE_MIB * 1024;

fn two_node_numa_view() -> Result<(), Failed> {
    let t0 = Instant::now();
    let (mut guest, ready) = GuestBuilder::new()
        .node(0, "0", NODE_MIB)
        .node(1, "1", NODE_MIB)
        .boot_until_ready()?;
    println!("ready: {ready:?}");

    let ids: Vec<u32> = ready.nodes.iter().map(|n| n.id).collect();
    if ids != [0, 1] {
        return Err(format!("expected nodes [0, 1], the guest reports {ids:?}").into());
    }
    let (node0, node1) = (&ready.nodes[0], &ready.nodes[1]);
    if node0.cpus != [0] || node1.cpus != [1] {
        return Err(format!(
            "expected cpus [0] and [1], got {:?} and {:?}",
            node0.cpus, node1.cpus
        )
        .into());
    }
    // A node's MemTotal counts the pages the kernel manages, so it never exceeds the
    // node's 256 MiB and falls short of it by what boot reserved there. Node 0 holds the
    // kernel image (about 8.6 MiB for this config: 6144K code, 869K rwdata, 628K rodata,
    // 756K init, 372K bss), the low 1 MiB and other early (memblock) reservations, page
    // tables, per-CPU areas and the memory map (struct page: 64 bytes per 4 KiB page, 4 MiB
    // per 256 MiB), which may land on node 0 for both nodes. Measured on a first boot:
    // "Memory: 500568K/523896K available (... 23072K reserved)" for both nodes together.
    // 48 MiB for node 0 leaves room for config growth; node 1 only loses its own memory
    // map and per-node structures, so 16 MiB.
    let limits = [(node0, 48 * 1024), (node1, 16 * 1024)];
    for (node, overhead_kib) in limits {
        let range = NODE_KIB - overhead_kib..=NODE_KIB;
        if !range.contains(&node.mem_total_kib) {
            return Err(format!(
                "node {} MemTotal {} KiB is outside {range:?} (256 MiB minus at most {overhead_kib} KiB of kernel overhead)",
                node.id, node.mem_total_kib
            )
            .into());
        }
    }

    guest.poweroff_cleanly()?;
    print_phase("two_node_numa_view", t0.elapsed());
    Ok(())
}

/// Cheap first check: the KVM the guests will use is there (in nested mode, the test
/// host's, which needs QEMU's emulated SVM).
fn kvm_usable() -> Result<(), Failed> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    if mempower_tests::is_inside_testhost() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
        if !cpuinfo.split_whitespace().any(|w| w == "svm") {
            return Err("the test host's /proc/cpuinfo has no svm flag".into());
        }
    }
    Ok(())
}

fn main() {
    mempower_tests::main(vec![
        mempower_tests::trial("kvm_usable", kvm_usable),
        mempower_tests::trial("two_node_numa_view", two_node_numa_view),
    ]);
}
