//! Boots a guest with hotplug regions and talks to its agent over vsock: through the
//! VMM's own client (the API's agent calls) and through `--vsock-socket` as any host
//! program would. Fills memory on node 1, offlines a block that holds part of it (the
//! guest migrates the pages), verifies the data, and onlines the block again.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_protocol::{
    read_frame, write_frame, MemoryBlock, Request, RequestFrame, Response, ResponseFrame,
    AGENT_PORT,
};
use libtest_mimic::Failed;
use mempower_api::NodeStatus;
use mempower_tests::{pages_in, print_phase, socket_path, GuestBuilder, VmApi};

const MIB: u64 = 1 << 20;
const FILL_MIB: u64 = 64;
const WAIT: Duration = Duration::from_secs(240);

/// Talks to the agent through the hybrid socket, as a host program would.
fn hello_through_vsock_socket(path: &Path) -> Result<(), Failed> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        return Err(format!("hybrid handshake answered {line:?}").into());
    }
    write_frame(&mut stream, &RequestFrame::new(77, Request::Hello))?;
    let answer: ResponseFrame = read_frame(&mut reader)?;
    assert_eq!(answer.id, 77);
    match answer.into_result() {
        Ok(Response::Hello {
            protocol_version, ..
        }) => assert_eq!(protocol_version, agent_protocol::PROTOCOL_VERSION),
        other => return Err(format!("hello through --vsock-socket: {other:?}").into()),
    }
    Ok(())
}

fn fill_offline_verify_online() -> Result<(), Failed> {
    let t0 = Instant::now();
    let api_path = socket_path("agent-test", "sock");
    let vsock = socket_path("agent-test", "vsock");
    let (mut guest, _) = GuestBuilder::new()
        .two_nodes(256, 1024, 512)
        .api_socket(&api_path)
        .arg("--vsock-socket")
        .arg(&vsock)
        .boot_until_ready()?;
    print_phase("boot to READY", t0.elapsed());

    // The VMM's client connects once the agent listens; then the guest plugs.
    let api = VmApi::new(&api_path);
    print_phase("agent connected", api.wait_agent(Duration::from_secs(60))?);
    let nodes = api.wait_plugged(WAIT)?;
    let Response::Inventory {
        block_size, blocks, ..
    } = api.agent(&Request::Inventory)?
    else {
        return Err("inventory: unexpected answer".into());
    };
    assert_eq!(block_size, 128 * MIB);
    let in_region = |n: &NodeStatus, b: &MemoryBlock| {
        (n.region_base..n.region_base + n.region_size).contains(&b.start)
    };
    for n in &nodes {
        let region: Vec<&MemoryBlock> = blocks.iter().filter(|b| in_region(n, b)).collect();
        for b in &region {
            assert_eq!(
                b.node,
                Some(n.id),
                "block {} is in node {}'s region",
                b.id,
                n.id
            );
        }
        let online = region.iter().filter(|b| b.online).count() as u64;
        assert_eq!(
            online * block_size,
            n.plugged_bytes,
            "node {}: online blocks vs plugged",
            n.id
        );
        assert!(
            region
                .iter()
                .filter(|b| b.online)
                .all(|b| b.zone == "Movable"),
            "{region:?}"
        );
    }

    // Fill on node 1; find a hotplugged block of node 1 that holds part of the fill.
    let migrated_before = api.vmstat("pgmigrate_success")?;
    let fill = api.fill(1, FILL_MIB * MIB, 42)?;
    let (handle, filled) = (fill.handle, &fill.blocks);
    let target = filled
        .iter()
        .filter(|p| {
            blocks
                .iter()
                .any(|b| b.id == p.block && in_region(&nodes[1], b))
        })
        .max_by_key(|p| p.pages)
        .ok_or_else(|| format!("the fill has no pages in node 1's hotplugged blocks: {filled:?}"))?
        .block;
    println!(
        "fill {handle}: {} pages in block {target} (of {filled:?})",
        pages_in(filled, target)
    );

    let t = Instant::now();
    let Response::BlockResults { results } = api.agent(&Request::Offline {
        blocks: vec![target],
    })?
    else {
        return Err("offline: unexpected answer".into());
    };
    assert_eq!(results.len(), 1);
    if let Some(e) = &results[0].error {
        return Err(format!("offlining block {target} failed: {e}").into());
    }
    print_phase(&format!("offlined block {target}"), t.elapsed());
    let migrated = api.vmstat("pgmigrate_success")? - migrated_before;
    println!("the guest migrated {migrated} pages");
    assert!(
        migrated >= pages_in(filled, target),
        "the fill's pages in block {target} were migrated"
    );

    let now = api.locate(handle)?;
    assert_eq!(
        pages_in(&now, target),
        0,
        "no page of the fill is left in the offline block"
    );
    // The data survived migration.
    assert_eq!(fill.bytes, FILL_MIB * MIB);
    api.verify(&fill)?;

    let Response::BlockResults { results } = api.agent(&Request::Online {
        blocks: vec![target],
        movable: true,
    })?
    else {
        return Err("online: unexpected answer".into());
    };
    assert!(results[0].error.is_none(), "{results:?}");

    // An untouched hotplugged block of node 0 is (almost) all free.
    let empty = blocks
        .iter()
        .filter(|b| b.online && in_region(&nodes[0], b))
        .map(|b| b.id)
        .max()
        .ok_or("node 0 has no online hotplugged block")?;
    let Response::BlockUsage { usage } = api.agent(&Request::BlockUsage {
        blocks: vec![empty],
    })?
    else {
        return Err("block_usage: unexpected answer".into());
    };
    let u = &usage[0];
    println!("block {empty}: {} of {} pages free", u.free_pages, u.pages);
    assert_eq!(u.pages, block_size / 4096);
    assert!(u.free_pages * 100 >= u.pages * 95, "{u:?}");

    api.release(handle)?;
    hello_through_vsock_socket(&vsock)?;

    guest.poweroff_cleanly()?;
    print_phase("fill_offline_verify_online", t0.elapsed());
    Ok(())
}

fn main() {
    mempower_tests::main(vec![mempower_tests::trial(
        "fill_offline_verify_online",
        fill_offline_verify_online,
    )]);
}
