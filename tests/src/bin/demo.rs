//! `mempower-demo`: boots the default two-node VM in the right mode and shows what the
//! guest sees of its NUMA topology, and what the VMM's API reports. `./demo.sh` runs it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mempower_tests::{print_phase, GuestBuilder, VmApi};

/// Boot memory of each of the two nodes (one vCPU each).
const BOOT_MIB: u64 = 256;
/// Each node's virtio-mem region, and how much of it the guest plugs at boot (MiB).
const HOTPLUG_MIB: u64 = 1024;
const REQUESTED_MIB: u64 = 512;

fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let socket = mempower_tests::socket_path("demo", "sock");
    let (mut guest, _) = GuestBuilder::new()
        .two_nodes(BOOT_MIB, HOTPLUG_MIB, REQUESTED_MIB)
        .api_socket(&socket)
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());

    let api = VmApi::new(&socket);
    let mempower = |args: &[&str]| -> Result<String, Box<dyn std::error::Error>> {
        api.cli(args).map_err(|e| e.to_string().into())
    };
    // The guest plugs its virtio-mem memory right after boot: wait for it, then look.
    let plugging = Instant::now();
    api.wait_plugged(Duration::from_secs(120))
        .map_err(|e| e.to_string())?;
    print_phase("guest plugged its hotplug memory", plugging.elapsed());
    let json: serde_json::Value = serde_json::from_str(&mempower(&["nodes"])?)?;
    let regions = json.as_array().cloned().unwrap_or_default();
    let ready = guest.ready_now(Duration::from_secs(60))?;

    println!();
    println!(
        "The guest ({}, up {} ms) sees:",
        ready.kernel, ready.uptime_ms
    );
    println!(
        "  {:<6} {:<6} {:>10} {:>12}",
        "node", "cpus", "boot MiB", "MemTotal MiB"
    );
    for node in &ready.nodes {
        let cpus: Vec<String> = node.cpus.iter().map(u32::to_string).collect();
        println!(
            "  {:<6} {:<6} {:>10} {:>12}",
            node.id,
            cpus.join(","),
            BOOT_MIB,
            node.mem_total_kib / 1024
        );
    }
    println!();
    println!("mempower nodes: each node's hotplug region (virtio-mem), in MiB:");
    println!(
        "  {:<6} {:>14} {:>6} {:>8} {:>10} {:>9}",
        "node", "region at", "size", "plugged", "requested", "resident"
    );
    for n in &regions {
        let mib = |key: &str| n[key].as_u64().unwrap_or(0) >> 20;
        println!(
            "  {:<6} {:>#14x} {:>6} {:>8} {:>10} {:>9}",
            n["id"].as_u64().unwrap_or(0),
            n["region_base"].as_u64().unwrap_or(0),
            mib("region_size"),
            mib("plugged_bytes"),
            mib("requested_bytes"),
            mib("resident_bytes")
        );
    }
    for n in &regions {
        let id = n["id"].as_u64().unwrap_or(0).to_string();
        let list: serde_json::Value =
            serde_json::from_str(&mempower(&["regions", "--node", &id])?)?;
        println!();
        println!("mempower regions --node {id}: 128 MiB regions (Linux memory blocks), MiB:");
        println!(
            "  {:<7} {:<12} {:<10} {:>8} {:>9} {:>7}",
            "region", "memory block", "state", "plugged", "resident", "in use"
        );
        for r in list.as_array().into_iter().flatten() {
            let mib = |key: &str| {
                r[key]
                    .as_u64()
                    .map_or("-".to_string(), |b| (b >> 20).to_string())
            };
            println!(
                "  {:<7} {:<12} {:<10} {:>8} {:>9} {:>7}",
                r["index"].as_u64().unwrap_or(0),
                format!("memory{}", r["memory_block"]),
                r["state"].as_str().unwrap_or("?"),
                mib("plugged_bytes"),
                mib("resident_bytes"),
                mib("in_use_bytes")
            );
        }
    }
    println!();
    println!("mempower vm: {}", mempower(&["vm"])?);
    println!();
    guest.poweroff_cleanly()?;
    print_phase("demo", t0.elapsed());
    Ok(())
}

fn main() -> ExitCode {
    mempower_tests::run_program("mempower-demo", Duration::from_secs(600), demo)
}
