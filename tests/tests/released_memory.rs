//! Released memory stays released, in one guest with one node of three plugged regions:
//!
//! 1. live data is written, then region 2 is evacuated: the host takes its memory back
//!    and removes its memory slot;
//! 2. the agent pokes guest-physical addresses of region 2 through /dev/mem, as a hostile
//!    guest would: reads return all ones, writes are dropped;
//! 3. the region's host-resident bytes are 0 before and after (both printed), the VMM
//!    still answers, and the live data verifies;
//! 4. region 2 is plugged again: it is guest RAM once more (a poke is refused), and a
//!    fill that reaches into it verifies, so its slot came back.
//!
//! And unplugged blocks of a region that stays (`unplugged_blocks_stay_unplugged`):
//!
//! 1. the guest plugs two regions and one 2 MiB block of a third: that region is
//!    partial, and holds no more host memory than its plugged block;
//! 2. the agent pokes the middle of its unplugged part (logically offline RAM, which
//!    the guest kernel gave up): KVM finds no page there, and the VMM stops the VM as
//!    the guest's fault (exit status 4, a `guest fault:` line), instead of letting the
//!    guest fault host memory in.

use std::time::{Duration, Instant};

use agent_protocol::{Request, Response};
use libtest_mimic::Failed;
use mempower_api::{RegionOutcome, RegionState, RegionStatus};
use mempower_tests::{boot_plugged, print_phase, socket_path, GuestBuilder, Stream, VmApi};

const MIB: u64 = 1 << 20;
const REGION: u64 = 128 * MIB;
const POKE: u32 = 4096;
/// What the VMM logs for a guest access to a released region.
const WARNING: &str = "is released and has no memory slot";

fn region(api: &VmApi, index: u32) -> Result<RegionStatus, Failed> {
    api.regions(0)?
        .into_iter()
        .find(|r| r.index == index)
        .ok_or_else(|| format!("no region {index}").into())
}

fn released_stays_released() -> Result<(), Failed> {
    let t0 = Instant::now();
    let api_path = socket_path("released", "sock");
    let builder =
        GuestBuilder::new()
            .node(0, "0", 256)
            .hotplug(0, 3 * REGION / MIB, 3 * REGION / MIB);
    let (mut guest, api) = boot_plugged(builder, &api_path, t0)?;

    // 1. Live data, then region 2 released.
    let live = api.fill(0, 64 * MIB, 31)?;
    let t = Instant::now();
    let job = api.run_job(
        &["evacuate", "--node", "0", "--regions", "2"],
        Duration::from_secs(300),
    )?;
    print_phase("evacuate region 2", t.elapsed());
    assert_eq!(job.results.len(), 1, "{job:?}");
    assert_eq!(job.results[0].outcome, RegionOutcome::Released, "{job:?}");
    let released = region(&api, 2)?;
    assert_eq!(
        (released.state, released.plugged_bytes),
        (RegionState::Released, 0)
    );
    let before = released.resident_bytes;

    // 2. The guest writes to it anyway.
    let t = Instant::now();
    for offset in [0, REGION / 2 + 0x1234, REGION - u64::from(POKE)] {
        let addr = released.base + offset;
        match api.agent(&Request::Poke {
            addr,
            len: POKE,
            byte: 0x5a,
        })? {
            Response::Poked {
                ones_before,
                ones_after,
                written_after,
                ..
            } => {
                println!(
                    "poke {addr:#x}+{POKE}: {ones_before} bytes read 0xff before the write, \
                     {ones_after} after, {written_after} read back as written"
                );
                assert_eq!(
                    (ones_before, ones_after, written_after),
                    (POKE, POKE, 0),
                    "reads are all ones and writes are dropped at {addr:#x}"
                );
            }
            other => return Err(format!("poke: {other:?}").into()),
        }
    }
    print_phase("3 pokes of the released region", t.elapsed());

    // 3. No memory came back for it, the VMM runs on, the data is intact.
    let after = region(&api, 2)?;
    println!(
        "released region 2 ({:#x}): host-resident bytes before the pokes {before}, after {}",
        released.base, after.resident_bytes
    );
    assert_eq!((before, after.resident_bytes), (0, 0));
    assert_eq!(after.state, RegionState::Released);
    assert!(
        matches!(api.agent(&Request::Hello)?, Response::Hello { .. }),
        "the VM is healthy"
    );
    api.verify(&live)?;
    let warnings: Vec<String> = guest
        .lines()
        .into_iter()
        .filter(|l| l.stream == Stream::Vmm && l.text.contains(WARNING))
        .map(|l| l.text)
        .collect();
    println!("VMM warnings about the pokes: {}", warnings.len());
    for w in &warnings {
        println!("  {w}");
    }
    // Rate-limited to one line a second per node, so at least one for three pokes.
    assert!(!warnings.is_empty(), "the VMM warned about no access");

    // 4. Plugged again, region 2 is guest RAM: pokes are refused, data there verifies.
    api.cli(&["plug", "--node", "0", "--region", "2"])?;
    api.wait_plugged(Duration::from_secs(120))?;
    let replugged = region(&api, 2)?;
    assert_eq!(replugged.state, RegionState::Plugged);
    let refused = api
        .agent(&Request::Poke {
            addr: released.base,
            len: 8,
            byte: 0x5a,
        })
        .map(|r| format!("{r:?}"))
        .err()
        .ok_or("a poke of plugged guest RAM was not refused")?;
    assert!(
        refused.to_string().contains("guest RAM in use"),
        "{refused}"
    );
    let big = api.fill(0, 288 * MIB, 32)?;
    assert!(
        big.blocks.iter().any(|b| b.block == replugged.memory_block),
        "the fill reached memory{} (region 2): {:?}",
        replugged.memory_block,
        big.blocks
    );
    api.verify(&big)?;
    api.verify(&live)?;

    guest.poweroff_cleanly()?;
    print_phase("released_stays_released", t0.elapsed());
    Ok(())
}

/// What `mempower run` exits with when the guest breaks a rule (`cli::EXIT_GUEST_FAULT`).
const EXIT_GUEST_FAULT: i32 = 4;

fn unplugged_blocks_stay_unplugged() -> Result<(), Failed> {
    let t0 = Instant::now();
    let api_path = socket_path("unplugged", "sock");
    let builder =
        GuestBuilder::new()
            .node(0, "0", 256)
            .hotplug(0, 3 * REGION / MIB, 2 * REGION / MIB + 2);
    let (mut guest, api) = boot_plugged(builder, &api_path, t0)?;

    // 1. A region with one block plugged holds at most that block.
    let partial = api
        .regions(0)?
        .into_iter()
        .find(|r| r.state == RegionState::Partial)
        .ok_or("no partly plugged region")?;
    println!(
        "region {} ({:#x}): {} bytes plugged, {} resident on the host",
        partial.index, partial.base, partial.plugged_bytes, partial.resident_bytes
    );
    assert_eq!(partial.plugged_bytes, 2 * MIB);
    assert!(partial.resident_bytes <= partial.plugged_bytes + 2 * MIB);

    // 2. The guest reads and writes its unplugged part anyway: the VM stops.
    let addr = partial.base + REGION / 2;
    let t = Instant::now();
    let answer = api.agent(&Request::Poke {
        addr,
        len: POKE,
        byte: 0x5a,
    });
    let status = guest.wait_exit(Duration::from_secs(120))?;
    print_phase("poke of an unplugged block", t.elapsed());
    assert!(answer.is_err(), "the poke was answered: {answer:?}");
    let fault = guest
        .lines()
        .into_iter()
        .find(|l| l.stream == Stream::Vmm && l.text.contains("guest fault:"))
        .map(|l| l.text)
        .ok_or_else(|| format!("no guest fault line: {}", guest.tail(20)))?;
    println!("the VMM: {fault}");
    assert_eq!(status.code(), Some(EXIT_GUEST_FAULT), "{}", guest.tail(20));
    assert!(fault.contains("unplugged"), "{fault}");
    print_phase("unplugged_blocks_stay_unplugged", t0.elapsed());
    Ok(())
}

fn main() {
    mempower_tests::main(vec![
        mempower_tests::trial("released_stays_released", released_stays_released),
        mempower_tests::trial(
            "unplugged_blocks_stay_unplugged",
            unplugged_blocks_stay_unplugged,
        ),
    ]);
}
