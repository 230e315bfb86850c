//! `mempower-demo`: boots the default two-node VM in the right mode and shows what the
//! guest sees of its NUMA topology, and what the VMM's API reports. `./demo.sh` runs it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mempower_tests::{is_inside_testhost, mode, nested_host, print_phase, GuestBuilder, Mode};

const NODES: [(u32, &str, u64); 2] = [(0, "0", 256), (1, "1", 256)];

fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let socket = std::env::temp_dir().join(format!("mempower-demo-{}.sock", std::process::id()));
    let mut builder = GuestBuilder::new().arg("--api-socket").arg(&socket);
    for (id, cpus, mib) in NODES {
        builder = builder.node(id, cpus, mib);
    }
    let mut guest = builder.boot()?;
    let ready = guest.wait_ready()?;
    print_phase("boot to READY", t0.elapsed());

    println!();
    println!(
        "The guest ({}, up {} ms) sees:",
        ready.kernel, ready.uptime_ms
    );
    println!(
        "  {:<6} {:<8} {:>12} {:>12}",
        "node", "cpus", "given", "MemTotal"
    );
    for (node, (_, _, mib)) in ready.nodes.iter().zip(NODES) {
        let cpus: Vec<String> = node.cpus.iter().map(u32::to_string).collect();
        println!(
            "  {:<6} {:<8} {:>8} MiB {:>8} MiB",
            node.id,
            cpus.join(","),
            mib,
            node.mem_total_kib / 1024
        );
    }
    let bin = mempower_tests::vmm_bin::mempower_bin()?;
    let api = std::process::Command::new(&bin)
        .arg("vm")
        .arg("--api-socket")
        .arg(&socket)
        .output()?;
    println!();
    println!("mempower vm --api-socket {}:", socket.display());
    println!("  {}", String::from_utf8_lossy(&api.stdout).trim());
    if !api.status.success() {
        return Err(format!(
            "mempower vm failed: {}",
            String::from_utf8_lossy(&api.stderr)
        )
        .into());
    }
    println!();
    let status = guest.poweroff()?;
    if status.code() != Some(0) {
        return Err(format!("mempower exited with {status}").into());
    }
    print_phase("demo", t0.elapsed());
    Ok(())
}

fn main() -> ExitCode {
    let result = match mode::mode() {
        Ok(Mode::Nested) if !is_inside_testhost() => nested_host()
            .map_err(|e| e.to_string())
            .and_then(|host| {
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                host.timeout(Duration::from_secs(600))
                    .run(&exe, &Vec::<String>::new())
                    .map_err(|e| e.to_string())
            })
            .and_then(|rc| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(format!("the demo failed in the test host (exit {rc})"))
                }
            }),
        Ok(_) => demo().map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mempower-demo: error: {e}");
            ExitCode::FAILURE
        }
    }
}
